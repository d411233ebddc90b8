"""Licence verdicts from package metadata, on a table of real-world metadata strings (issue 22): permissive only
when everything declared is permissive, free text only when exactly one licence is named, SPDX parsed properly."""

from __future__ import annotations

from email.message import Message

import pytest

from dataset_curation.licences import licence_of, licence_of_text, spdx_permissive

P, N, U = "permissive", "not permissive", "unknown"

MIT_TEXT = ("MIT License\n\nCopyright (c) 2021 Taneli Hukkinen\n\nPermission is hereby granted, free of charge, to "
            "any person obtaining a copy of this software and associated documentation files (the \"Software\"), to "
            "deal in the Software without restriction, including without limitation the rights to use, copy, modify,"
            " merge, publish, distribute, sublicense, and/or sell copies of the Software.")
BSD3_TEXT = ("Copyright (c) 2013-2026, Kim Davies and contributors.\nAll rights reserved.\n\nRedistribution and use "
             "in source and binary forms, with or without modification, are permitted provided that the following "
             "conditions are met:\n3. Neither the name of the copyright holder nor the names of its contributors "
             "may be used to endorse or promote products derived from this software.")
GPL_QUOTING_MIT = ("                    GNU GENERAL PUBLIC LICENSE\n                       Version 3, 29 June 2007\n\n"
                   " Copyright (C) 2007 Free Software Foundation, Inc. <https://fsf.org/>\n\n"
                   "This program is free software: you can redistribute it and/or modify it under the terms of the "
                   "GNU General Public License as published by the Free Software Foundation.\n\nParts of this "
                   "program were taken from a project whose notice reads: Permission is hereby granted, free of "
                   "charge, to any person obtaining a copy of this software.")
CERTIFI_LICENSE = ("This package contains a modified version of ca-bundle.crt:\n\nca-bundle.crt -- Bundle of CA Root "
                   "Certificates\n\nIt contains the certificates in PEM format and therefore\ncan be directly used "
                   "with curl / libcurl / php_curl, or with\nan Apache+mod_ssl webserver for SSL client "
                   "authentication.\n\n***** BEGIN LICENSE BLOCK *****\nThis Source Code Form is subject to the "
                   "terms of the Mozilla Public License,\nv. 2.0. If a copy of the MPL was not distributed with this "
                   "file, You can obtain\none at http://mozilla.org/MPL/2.0/.\n\n***** END LICENSE BLOCK *****")
CL = "Classifier: License :: "

# (metadata lines, expected verdict, expected licence or None to skip that check)
TABLE = [
    # the examples
    ("License: GPLv3, some files MIT-licensed", U, None),
    ("License: GPL and BSD", U, None),
    ("License: Commercial license, not MIT", U, None),
    (f"{CL}Other/Proprietary License\n{CL}OSI Approved :: MIT License", U, None),
    (f"{CL}OSI Approved :: European Union Public Licence 1.2 (EUPL 1.2)\n{CL}OSI Approved :: MIT License", U,
     None),
    (f"{CL}OSI Approved :: Artistic License\n{CL}OSI Approved :: BSD License", U, None),
    (f"License-Expression: GPL-2.0-only WITH Classpath-exception-2.0\n{CL}OSI Approved :: BSD License", N, None),
    ("License-Expression: GPL-2.0-only WITH Classpath-exception-2.0", N, None),
    ("License-Expression: mit", P, "mit"),
    ("License: mit", P, "mit"),
    ("License-Expression: MIT OR Apache-2.0", P, "MIT OR Apache-2.0"),
    ("License-Expression: (MIT AND BSD-3-Clause)", P, "(MIT AND BSD-3-Clause)"),
    (f"{CL}OSI Approved :: Apache Software License", P, "Apache-2.0"),
    # SPDX expressions as the metadata of installed packages spell them
    ("License-Expression: BSD-3-Clause AND 0BSD AND MIT AND Zlib AND CC0-1.0", P, None),  # numpy
    ("License-Expression: Apache-2.0 WITH LLVM-exception", P, None),
    ("License-Expression: apache-2.0 with llvm-exception", P, None),
    ("License-Expression: MIT WITH Classpath-exception-2.0", N, None),  # an exception we cannot vouch for
    ("License-Expression: MPL-2.0 AND MIT", N, None),  # tqdm
    ("License-Expression: GPL-3.0-or-later OR MIT", P, None),
    ("License-Expression: (GPL-3.0-only OR MIT) AND LGPL-2.1-only", N, None),
    ("License-Expression: LicenseRef-Proprietary", N, None),
    ("License-Expression: MIT AND (", U, None),
    ("License-Expression: MIT License", U, None),  # not an SPDX expression
    ("License-Expression: MIT\nClassifier: License :: OSI Approved :: Apache Software License", P,
     "MIT AND Apache-2.0"),  # rfc3987-syntax: both permissive
    ("License-Expression: MIT\nClassifier: License :: OSI Approved :: GNU General Public License v3 (GPLv3)", N,
     None),
    # classifiers
    (f"{CL}OSI Approved :: BSD License", P, "BSD"),
    (f"{CL}OSI Approved :: MIT License\n{CL}OSI Approved", P, "MIT"),
    (f"{CL}OSI Approved :: ISC License (ISCL)", P, "ISC"),
    (f"{CL}OSI Approved :: Python Software Foundation License", P, "PSF-2.0"),
    (f"{CL}OSI Approved :: MIT No Attribution License (MIT-0)", P, "MIT-0"),
    (f"{CL}OSI Approved :: zlib/libpng License", P, "Zlib"),
    (f"{CL}OSI Approved :: Boost Software License 1.0 (BSL-1.0)", P, "BSL-1.0"),
    (f"{CL}CC0 1.0 Universal (CC0 1.0) Public Domain Dedication", P, "CC0-1.0"),
    (f"{CL}Public Domain", P, "Public-Domain"),
    (f"{CL}OSI Approved :: The Unlicense (Unlicense)", P, "Unlicense"),
    (f"{CL}OSI Approved :: Mozilla Public License 2.0 (MPL 2.0)", N, "MPL"),
    ("License: MPL-2.0\n" f"{CL}OSI Approved :: Mozilla Public License 2.0 (MPL 2.0)", N, "MPL-2.0"),  # certifi
    (f"{CL}OSI Approved :: GNU Lesser General Public License v3 (LGPLv3)", N, "LGPL"),  # autocommand
    (f"{CL}OSI Approved :: GNU Library or Lesser General Public License (LGPL)", N, "LGPL"),
    (f"{CL}OSI Approved :: GNU General Public License v2 or later (GPLv2+)", N, "GPL"),
    (f"{CL}OSI Approved :: GNU Affero General Public License v3", N, "AGPL"),
    (f"{CL}OSI Approved :: Eclipse Public License 2.0 (EPL-2.0)", N, "EPL"),
    (f"{CL}Freely Distributable", U, None),
    (f"{CL}Free for non-commercial use", U, None),
    (f"{CL}OSI Approved :: MIT License\n{CL}OSI Approved :: GNU General Public License v3 (GPLv3)", N, None),
    # free text: one licence's name
    ("License: MIT License", P, "MIT"),
    ("License: The MIT License (MIT)", P, "MIT"),
    ("License: Apache 2.0 License", P, "Apache-2.0"),
    ("License: Apache License, Version 2.0", P, "Apache-2.0"),
    ("License: Apache Software License 2.0", P, "Apache-2.0"),
    ("License: BSD", P, "BSD"),
    ("License: 3-Clause BSD License", P, "BSD-3-Clause"),
    ("License: BSD 2-Clause License", P, "BSD-2-Clause"),
    ("License: new BSD", P, "BSD-3-Clause"),
    ("License: PSF", P, "PSF-2.0"),
    ("License: ISC license", P, "ISC"),
    ("License: LGPLv3", N, "LGPL"),  # autocommand's License field
    ("License: GPLv2+", N, "GPL"),
    ("License: GNU GPL v3 or later", N, "GPL"),
    ("License: MPL-2.0 AND MIT", N, "MPL-2.0 AND MIT"),
    ("License: Dual License", U, None),
    ("License: MIT or Apache", U, None),  # two names in words (an SPDX OR would be fine)
    ("License: Copyright (c) 2015 Some Company", U, None),
    ("License: Proprietary", U, None),
    ("License: UNKNOWN", U, ""),
    ("License: UNKNOWN\n" f"{CL}OSI Approved :: ISC License (ISCL)", P, "ISC"),
    ("License: LICENSE.txt\n" f"{CL}OSI Approved :: MIT License", P, "MIT"),
    ("", U, ""),
]


def _meta(lines: str, text: str | None = None) -> Message:
    m = Message()
    for line in filter(None, lines.split("\n")):
        key, _, value = line.partition(": ")
        m[key] = value
    if text is not None:
        m["License"] = text
    return m


@pytest.mark.parametrize("lines,verdict,licence", TABLE, ids=[t[0][:60] for t in TABLE])
def test_licence_of_real_world_metadata(lines, verdict, licence):
    got = licence_of(_meta(lines))
    assert got[1] == verdict, got
    if licence is not None:
        assert got[0] == licence


@pytest.mark.parametrize("text,verdict,licence", [
    (MIT_TEXT, P, "MIT"), (BSD3_TEXT, P, "BSD-3-Clause"),
    (GPL_QUOTING_MIT, U, '"GNU GENERAL PUBLIC LICENSE Version 3, 29..."'),
])
def test_licence_texts_in_the_license_field(text, verdict, licence):
    assert licence_of(_meta("", text)) == (licence, verdict)  # an unreadable declaration is quoted, shortened


def test_a_licence_text_with_a_permissive_classifier_still_needs_the_text_to_be_readable():
    # scipy's License field is its BSD text followed by the licences of what its wheels bundle (GPL among them)
    bundled = BSD3_TEXT + "\n\n" + GPL_QUOTING_MIT
    assert licence_of(_meta(f"{CL}OSI Approved :: BSD License", bundled))[1] == U


def test_licence_files_of_vendored_copies():
    assert licence_of_text(CERTIFI_LICENSE) == ("MPL", N)  # names Apache (a web server) but only the MPL's text
    assert licence_of_text(MIT_TEXT) == ("MIT", P)
    assert licence_of_text("This software is made available under the terms of *either* of the licenses found in "
                           "LICENSE.APACHE or LICENSE.BSD.") == ("", U)  # a pointer, not a licence
    assert licence_of_text(GPL_QUOTING_MIT) == ("", U)
    lgpl = ("GNU LESSER GENERAL PUBLIC LICENSE\nVersion 3, 29 June 2007\n\nThis version of the GNU Lesser General "
            "Public License incorporates the terms and conditions of version 3 of the GNU General Public License")
    assert licence_of_text(lgpl) == ("LGPL", N)


def test_spdx_parser():
    assert spdx_permissive("MIT") and spdx_permissive("mit") and spdx_permissive("Apache-2.0 with LLVM-exception")
    assert spdx_permissive("GPL-2.0-only OR (MIT AND ISC)")
    assert spdx_permissive("(MIT OR GPL-3.0-only) AND (BSD-3-Clause OR LGPL-2.1-only)")
    assert spdx_permissive("GPL-2.0-only WITH Classpath-exception-2.0") is False  # the exception is consumed
    assert spdx_permissive("GPL-2.0-only WITH Classpath-exception-2.0 OR MIT") is True
    assert spdx_permissive("MIT AND GPL-2.0-only WITH Classpath-exception-2.0") is False
    assert spdx_permissive("MPL-2.0 AND MIT") is False and spdx_permissive("GPL-3.0-or-later") is False
    for bad in ("MIT AND (", "MIT AND", "(MIT", "MIT)", "MIT WITH", "WITH MIT", "MIT Apache-2.0", ""):
        assert spdx_permissive(bad) is None, bad
