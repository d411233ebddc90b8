"""One learner's answers to every exercise, written from the definitions (no calls to the packages' versions).

CI runs each notebook twice: as shipped, where every `# YOUR CODE: name` cell is a stub, and with that cell
replaced by the function or class of the same name below (`python notebooks/solve.py`), under COURSE_STRICT=1 so
any check that does not pass fails the run. tests/test_course_checks.py also hands these to the checks.
Each definition is self-contained apart from the imports at the top and the earlier exercises it builds on, as it
would be in the notebook.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter

import numpy as np
import torch
import torch.nn as nn

# ----------------------------------------------------------------------------- week 17: data


def my_minhash(shingle_sets, num_perm, seed):
    prime = (1 << 31) - 1  # small enough that a * h + b fits in uint64
    rng = np.random.default_rng(seed)
    a = rng.integers(1, prime, num_perm, dtype=np.uint64)
    b = rng.integers(0, prime, num_perm, dtype=np.uint64)
    out = np.full((len(shingle_sets), num_perm), prime, dtype=np.uint64)
    for row, shingles in enumerate(shingle_sets):
        if shingles:
            # crc32 is the same in every process (Python's hash() of a str is not), reduced below the prime
            h = np.array([zlib.crc32(s.encode("utf-8")) % prime for s in shingles], dtype=np.uint64)
            out[row] = ((h[:, None] * a[None, :] + b[None, :]) % prime).min(axis=0)
    return out


def my_lsh_candidates(sig, bands, rows):
    pairs = set()
    for k in range(bands):
        buckets = {}
        for doc in range(len(sig)):
            key = tuple(sig[doc, k * rows:(k + 1) * rows].tolist())
            buckets.setdefault(key, []).append(doc)
        for docs in buckets.values():
            for i in range(len(docs)):
                for j in range(i + 1, len(docs)):
                    pairs.add((docs[i], docs[j]))
    return pairs


def my_clusters(n, pairs):
    parent = list(range(n))

    def root(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for i, j in pairs:
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[rj] = ri
    groups = {}
    for x in range(n):
        groups.setdefault(root(x), []).append(x)
    return [g for g in groups.values() if len(g) > 1]


def my_choose_bands(num_perm, threshold):
    below = np.linspace(0.0, threshold, 401)
    above = np.linspace(threshold, 1.0, 401)

    def area(y, x):  # trapezoid rule
        return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum())

    best, best_cost = None, float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            false_pos = area(1 - (1 - below**r) ** b, below)  # pairs below the threshold that become candidates
            false_neg = area((1 - above**r) ** b, above)  # pairs above it that do not
            if false_pos + false_neg < best_cost:
                best, best_cost = (b, r), false_pos + false_neg
    return best


def my_dup_lines(text):
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    if not lines:
        return 0.0, 0.0
    seen, repeats, repeat_chars = set(), 0, 0
    for line in lines:
        if line in seen:
            repeats += 1
            repeat_chars += len(line)
        seen.add(line)
    return repeats / len(lines), repeat_chars / sum(len(line) for line in lines)


def my_train_bpe(text, num_merges):
    from dataset_curation.bpe import pretokenize

    words = Counter(pretokenize(text))
    seqs = {w: list(w.encode("utf-8")) for w in words}
    merges = []
    for r in range(num_merges):
        counts = Counter()
        for w, freq in words.items():
            s = seqs[w]
            for i in range(len(s) - 1):
                counts[(s[i], s[i + 1])] += freq
        if not counts or max(counts.values()) < 2:
            break
        top = max(counts.values())
        pair = min(p for p, c in counts.items() if c == top)
        merges.append(pair)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == pair:
                    out.append(256 + r)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def my_bpe_encode(text, merges):
    from dataset_curation.bpe import pretokenize

    rank = {tuple(m): r for r, m in enumerate(merges)}
    ids = []
    for piece in pretokenize(text):
        seq = list(piece.encode("utf-8"))
        while len(seq) > 1:
            pairs = [(rank[p], p) for p in zip(seq, seq[1:]) if p in rank]
            if not pairs:
                break
            r, pair = min(pairs)
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
                    out.append(256 + r)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seq = out
        ids += seq
    return ids


def my_train_bpe_incremental(text, num_merges):
    import heapq

    from dataset_curation.bpe import pretokenize

    words = Counter(pretokenize(text))
    seqs = [list(w.encode("utf-8")) for w in words]
    freq = list(words.values())
    counts, holders = Counter(), {}
    for j, s in enumerate(seqs):
        for p in zip(s, s[1:]):
            counts[p] += freq[j]
            holders.setdefault(p, set()).add(j)
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)
    merges = []
    while len(merges) < num_merges and heap:
        c, pair = heapq.heappop(heap)
        if counts.get(pair) != -c:
            continue  # pushed before its count last changed
        if -c < 2:
            break
        new = 256 + len(merges)
        merges.append(pair)
        touched = set()
        for j in holders.pop(pair, ()):
            s, f = seqs[j], freq[j]
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == pair[0] and s[i + 1] == pair[1]:
                    out.append(new)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            for p in zip(s, s[1:]):
                counts[p] -= f
                touched.add(p)
            for p in zip(out, out[1:]):
                counts[p] += f
                holders.setdefault(p, set()).add(j)
                touched.add(p)
            seqs[j] = out
        counts.pop(pair, None)
        for p in touched:
            if counts.get(p, 0) > 0:
                heapq.heappush(heap, (-counts[p], p))
            else:
                counts.pop(p, None)
    return merges


# ----------------------------------------------------------------------------- week 17: metrics


def my_cross_entropy(logits, targets, ignore_index=-100):
    keep = targets != ignore_index
    z = logits[keep].float()
    z = z - z.max(dim=-1, keepdim=True).values  # the largest logit becomes 0: exp() cannot overflow
    log_norm = torch.log(torch.exp(z).sum(dim=-1))
    picked = z.gather(1, targets[keep].unsqueeze(1)).squeeze(1)
    return (log_norm - picked).sum() / keep.sum()


def my_perplexity(model_fn, token_ids, window, stride):
    nll, count, scored_until, start = 0.0, 0, 0, 0
    last = len(token_ids) - 1
    while True:
        end = min(start + window, last)
        logits = model_fn(token_ids[None, start:end])[0].double()
        logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        for pos in range(start, end):
            target = pos + 1
            if target > scored_until:
                nll -= float(logp[pos - start, token_ids[target]])
                count += 1
        scored_until = end
        if end == last:
            return math.exp(nll / count)
        start += stride


def _ngrams(words, n):
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def my_bleu(hypotheses, references):
    matches, totals, hyp_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for i, hyp in enumerate(hypotheses):
        h = hyp.split()
        refs = [stream[i].split() for stream in references]
        hyp_len += len(h)
        ref_len += min(refs, key=lambda r: (abs(len(r) - len(h)), len(r))).__len__()
        for n in range(1, 5):
            best = Counter()
            for r in refs:
                for g, c in _ngrams(r, n).items():
                    best[g] = max(best[g], c)
            matches[n - 1] += sum(min(c, best[g]) for g, c in _ngrams(h, n).items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * brevity * math.exp(log_precision)


def my_rouge(prediction, reference):
    p, r = prediction.split(), reference.split()

    def f_score(match, n_pred, n_ref):
        if n_pred == 0 or n_ref == 0 or match == 0:
            return 0.0
        precision, recall = match / n_pred, match / n_ref
        return 2 * precision * recall / (precision + recall)

    scores = {}
    for n in (1, 2):
        pg, rg = _ngrams(p, n), _ngrams(r, n)
        scores[f"rouge{n}"] = f_score(sum((pg & rg).values()), sum(pg.values()), sum(rg.values()))
    table = [[0] * (len(r) + 1) for _ in range(len(p) + 1)]  # longest common subsequence
    for i in range(len(p)):
        for j in range(len(r)):
            table[i + 1][j + 1] = table[i][j] + 1 if p[i] == r[j] else max(table[i][j + 1], table[i + 1][j])
    scores["rougeL"] = f_score(table[-1][-1], len(p), len(r))
    return scores


# ----------------------------------------------------------------------------- week 17: efficient training


class MyScaler:
    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
        self.scale_value = float(init_scale)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.good_steps = 0
        self.found_inf = False
        self.unscaled = False

    def scale(self, loss):
        return loss * self.scale_value

    def unscale_(self, optimizer):
        if self.unscaled:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(1.0 / self.scale_value)
                    if not torch.isfinite(p.grad).all():
                        self.found_inf = True
        self.unscaled = True

    def step(self, optimizer):
        self.unscale_(optimizer)
        if not self.found_inf:
            optimizer.step()

    def update(self):
        if self.found_inf:
            self.scale_value *= self.backoff_factor
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale_value *= self.growth_factor
                self.good_steps = 0
        self.found_inf = False
        self.unscaled = False

    def get_scale(self):
        return self.scale_value

    def state_dict(self):
        return {"scale": self.scale_value, "good_steps": self.good_steps}


def my_adamw_step(p, grad, m, v, t, lr, beta1, beta2, eps, weight_decay):
    p = p * (1 - lr * weight_decay)  # decoupled: the decay never goes through m and v
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad * grad
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    return p - lr * m_hat / (torch.sqrt(v_hat) + eps), m, v


def my_lr(it, warmup_iters, lr_decay_iters, lr, min_lr):
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def my_clip_grad_norm(parameters, max_norm):
    grads = [p.grad for p in parameters if p.grad is not None]
    total = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    if total > max_norm:
        for g in grads:
            g.mul_(max_norm / (total + 1e-6))
    return total


def my_accumulate(model, optimizer, micro_batches):
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for x, y in micro_batches:
        _, loss = model(x, y)
        (loss / len(micro_batches)).backward()
        total += loss.item()
    optimizer.step()
    return total / len(micro_batches)


# ----------------------------------------------------------------------------- week 18: the model


def my_attention(q, k, v):
    t, d = q.size(-2), q.size(-1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)
    future = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def my_causal_self_attention(x, attn):
    b, t, c = x.shape
    h = attn.n_head
    q, k, v = attn.c_attn(x).split(c, dim=2)
    q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in (q, k, v))
    y = my_attention(q, k, v)
    return attn.c_proj(y.transpose(1, 2).reshape(b, t, c))


def my_layer_norm(x, weight, bias, eps):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * weight
    return y if bias is None else y + bias


def my_rms_norm(x, weight, eps):
    xf = x.float()
    y = xf / torch.sqrt((xf * xf).mean(dim=-1, keepdim=True) + eps) * weight
    return y.to(x.dtype)


def my_mlp(x, mlp, kind="gelu"):
    h = mlp.c_fc(x)
    if kind == "gelu":
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    elif kind == "relu2":
        h = torch.clamp(h, min=0) ** 2
    else:  # swiglu
        gate, up = h.chunk(2, dim=-1)
        h = gate * torch.sigmoid(gate) * up
    return mlp.c_proj(h)


def my_block(x, block):
    ln1, ln2 = block.ln_1, block.ln_2
    x = x + my_causal_self_attention(my_layer_norm(x, ln1.weight, ln1.bias, ln1.eps), block.attn)
    return x + my_mlp(my_layer_norm(x, ln2.weight, ln2.bias, ln2.eps), block.mlp)


def my_rope(x, theta):
    t, hd = x.size(-2), x.size(-1)
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.arange(t, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)  # dim i and dim i + hd/2 share an angle
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * torch.cos(angles) + rotated * torch.sin(angles)


class Weights(nn.Module):
    """A named box of layers: holds parameters, my functions do the computing."""

    def __init__(self, **layers):
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)


class NormWeights(nn.Module):
    """RMSNorm's one parameter, named as minilm names it."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class MyGPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        c, bias, hd = config.n_embd, config.bias, config.n_embd // config.n_head
        norm = (lambda: NormWeights(c)) if config.norm == "rmsnorm" else (lambda: nn.LayerNorm(c, bias=bias))
        hidden = getattr(config, "mlp_hidden", 0) or (
            64 * math.ceil(8 * c / 3 / 64) if config.mlp == "swiglu" else 4 * c)
        blocks = []
        for _ in range(config.n_layer):
            attn = Weights(c_attn=nn.Linear(c, 3 * c, bias=bias), c_proj=nn.Linear(c, c, bias=bias))
            if config.qk_norm:
                attn.q_norm, attn.k_norm = NormWeights(hd), NormWeights(hd)
            attn.n_head = config.n_head
            up = nn.Linear(c, 2 * hidden if config.mlp == "swiglu" else hidden, bias=bias)
            blocks.append(Weights(ln_1=norm(), attn=attn, ln_2=norm(),
                                  mlp=Weights(c_fc=up, c_proj=nn.Linear(hidden, c, bias=bias))))
        parts = dict(wte=nn.Embedding(config.vocab_size, c), h=nn.ModuleList(blocks), ln_f=norm())
        if config.pos == "learned":
            parts["wpe"] = nn.Embedding(config.block_size, c)
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(c, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # one matrix embeds tokens and scores them
        for name, p in self.named_parameters():  # GPT-2's initialisation
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith("c_proj.weight") and config.zero_init:  # each block starts as the identity
                nn.init.zeros_(p)
            else:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def norm(self, x, layer):
        if self.config.norm == "rmsnorm":
            return my_rms_norm(x, layer.weight, layer.eps)
        return my_layer_norm(x, layer.weight, layer.bias, layer.eps)

    def attend(self, x, attn):
        b, t, c = x.shape
        h = attn.n_head
        q, k, v = attn.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in (q, k, v))
        if self.config.qk_norm:
            q, k = self.norm(q, attn.q_norm), self.norm(k, attn.k_norm)
        if self.config.pos == "rope":
            q, k = my_rope(q, self.config.rope_theta), my_rope(k, self.config.rope_theta)
        y = my_attention(q, k, v)
        return attn.c_proj(y.transpose(1, 2).reshape(b, t, c))

    def forward(self, idx, targets=None):
        tr = self.transformer
        x = tr.wte(idx)
        if self.config.pos == "learned":
            x = x + tr.wpe(torch.arange(idx.size(1), device=idx.device))
        for blk in tr.h:
            x = x + self.attend(self.norm(x, blk.ln_1), blk.attn)
            x = x + my_mlp(self.norm(x, blk.ln_2), blk.mlp, self.config.mlp)
        logits = self.lm_head(self.norm(x, tr.ln_f))
        if targets is None:
            return logits, None
        return logits, my_cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def my_overfit(model, x, y, steps):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- week 18: sampling


def my_probs(logits, temperature, top_k, top_p):
    z = logits / temperature
    if top_k:
        kth = torch.sort(z, dim=-1, descending=True).values[:, min(top_k, z.size(-1)) - 1:min(top_k, z.size(-1))]
        z = torch.where(z < kth, torch.full_like(z, float("-inf")), z)
    probs = torch.softmax(z, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the tokens ranked above each one
        sorted_p = torch.where(before >= top_p, torch.zeros_like(sorted_p), sorted_p)
        probs = torch.zeros_like(probs).scatter(1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


# ----------------------------------------------------------------------------- week 18: scaling laws


def my_fit_law(N, D, L):
    from scipy.optimize import minimize

    lN, lD, lL = np.log(N), np.log(D), np.log(L)

    def objective(t):
        a, b, e, alpha, beta = t
        r = np.logaddexp(np.logaddexp(a - alpha * lN, b - beta * lD), e) - lL
        delta = 1e-3
        return np.sum(np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)))

    grid = np.stack(np.meshgrid([0.0, 5.0, 10.0, 15.0], [0.0, 5.0, 10.0, 15.0], [0.0, 0.5, 1.0], [0.3, 0.6, 1.0],
                                [0.3, 0.6, 1.0]), -1).reshape(-1, 5)
    starts = sorted(grid, key=objective)[:6]
    best = min((minimize(objective, s, method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000})
                for s in starts), key=lambda r: r.fun)
    a, b, e, alpha, beta = best.x
    return {"E": np.exp(e), "A": np.exp(a), "B": np.exp(b), "alpha": alpha, "beta": beta}
