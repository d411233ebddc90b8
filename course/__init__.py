"""The course around the packages: self-checks for the exercises (course.check), progress (python -m course status)
and the helpers the notebooks share (course.nb)."""
