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
    z = logits.float()
    # The row max keeps exp() from overflowing. The loss does not depend on it (it cancels), so its gradient is 0:
    # detached, backward skips a pass over the (N, V) logits.
    z = z - z.amax(dim=-1, keepdim=True).detach()
    log_norm = torch.log(torch.exp(z).sum(dim=-1))
    picked = z.gather(1, torch.where(keep, targets, 0).unsqueeze(1)).squeeze(1)  # an ignored target: any valid index
    return ((log_norm - picked) * keep).sum() / keep.sum()


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
    scores = (q * (1.0 / math.sqrt(d))) @ k.transpose(-2, -1)  # scaling q is cheaper than the (T, T) scores
    future = torch.triu(torch.ones(t, t, dtype=torch.bool, device=q.device), diagonal=1)
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
    y = xf * torch.rsqrt((xf * xf).mean(dim=-1, keepdim=True) + eps) * weight
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
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=x.device) / hd)
    angles = torch.arange(t, dtype=torch.float32, device=x.device)[:, None] * inv_freq[None, :]
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
    def __init__(self, config, checkpoint=None):
        super().__init__()
        if config.grad_checkpoint and checkpoint is None:
            raise ValueError("config.grad_checkpoint is true: pass checkpoint=my_checkpoint (notebook 04), the "
                             "function that runs each block without keeping its activations")
        self.config, self.checkpoint = config, checkpoint
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
        if self.config.qk_norm:  # always RMSNorm, whichever norm the blocks use
            q, k = (my_rms_norm(z, n.weight, n.eps) for z, n in ((q, attn.q_norm), (k, attn.k_norm)))
        if self.config.pos == "rope":
            q, k = my_rope(q, self.config.rope_theta), my_rope(k, self.config.rope_theta)
        y = my_attention(q, k, v)
        return attn.c_proj(y.transpose(1, 2).reshape(b, t, c))

    def block(self, x, blk):
        x = x + self.attend(self.norm(x, blk.ln_1), blk.attn)
        return x + my_mlp(self.norm(x, blk.ln_2), blk.mlp, self.config.mlp)

    def forward(self, idx, targets=None):
        tr = self.transformer
        x = tr.wte(idx)
        if self.config.pos == "learned":
            x = x + tr.wpe(torch.arange(idx.size(1), device=idx.device))
        for blk in tr.h:
            if self.config.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = self.checkpoint(self.block, x, blk)  # backward recomputes the block instead of storing it
            else:
                x = self.block(x, blk)
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


# ----------------------------------------------------------------------------- week 18: the training stack


class MyAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # the moments start at zero; the step count lives with them, so it is saved too
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t, m, v, g = state["step"], state["exp_avg"], state["exp_avg_sq"], p.grad
                p.mul_(1 - lr * wd)  # decoupled: the decay never passes through m and v
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
        return loss


def my_newton_schulz(g, coefficients=(3.4445, -4.7750, 2.0315), steps=5, eps=1e-7):
    a, b, c = coefficients
    x = g.bfloat16()  # a copy: the momentum buffer is never scaled in place
    tall = g.size(0) > g.size(1)
    if tall:  # work on the wide side, so the Gram matrix x x^T is the small one
        x = x.T
    x = x / x.norm().clamp(min=eps)  # Frobenius norm >= spectral norm: every singular value is now <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b A + c A^2) x
    return x.T if tall else x


class MyMuon(torch.optim.Optimizer):
    def __init__(self, params, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                 coefficients=(3.4445, -4.7750, 2.0315), steps=5, eps=1e-7):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      coefficients=coefficients, steps=steps, eps=eps))
        for group in self.param_groups:
            if any(p.dim() != 2 for p in group["params"]):
                raise ValueError("MyMuon updates 2-D matrices only; give vectors and embeddings to MyAdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                o = my_newton_schulz(update, group["coefficients"], group["steps"], group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                # every direction of o has size ~1; a tall matrix gets a larger step so its rows move as much
                p.add_(o, alpha=-lr * math.sqrt(max(1.0, p.size(0) / p.size(1))))
        return loss


def my_optimizers(model, lr, muon_lr, weight_decay, betas=(0.9, 0.95), muon_momentum=0.95):
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden, seen = [], set()
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if (isinstance(m, nn.Linear) and not name.endswith("lm_head") and w.requires_grad
                and id(w) not in embedded and id(w) not in seen):
            seen.add(id(w))
            hidden.append(w)
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    muon = MyMuon([{"params": hidden, "peak_lr": muon_lr}], lr=muon_lr, weight_decay=weight_decay,
                  momentum=muon_momentum)
    # as minilm: matrices decay (the embeddings and the head too), gains and biases do not
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay, "peak_lr": lr},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "peak_lr": lr}]
    return [muon, MyAdamW([g for g in groups if g["params"]], lr=lr, betas=betas)]


def my_get_batch(tokens, batch_size, block_size, device, rng):
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
    x = torch.from_numpy(np.stack([tokens[i:i + block_size] for i in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([tokens[i + 1:i + 1 + block_size] for i in starts]).astype(np.int64))
    if torch.device(device).type == "cuda":  # pinned pages copy to the GPU while it still computes
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def my_save_checkpoint(path, model, optimizers, step, data_rng, **fields):
    import os
    import random
    import tempfile
    from pathlib import Path

    np_state = np.random.get_state()
    ckpt = {"model": model.state_dict(), "optimizer": [o.state_dict() for o in optimizers], "step": step,
            "rng": {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
                    "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                    "torch": torch.get_rng_state()},
            "data": {"rng": data_rng.bit_generator.state}, "best_val_loss": float("inf"), "config": {},
            "meta": {}, "extra": {}}
    if torch.cuda.is_available():
        ckpt["rng"]["cuda"] = torch.cuda.get_rng_state()
    ckpt.update(fields)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:  # a crash mid-write leaves the old checkpoint, never half of a new one
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def my_load_checkpoint(path, model, optimizers, data_rng):
    import random

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    for o, state in zip(optimizers, ckpt["optimizer"], strict=True):
        o.load_state_dict(state)
    r = ckpt["rng"]
    random.setstate((r["python"][0], tuple(r["python"][1]), r["python"][2]))
    np.random.set_state((r["numpy"][0], r["numpy"][1].numpy().astype(np.uint32), *r["numpy"][2:]))
    torch.set_rng_state(r["torch"])
    if "cuda" in r and torch.cuda.is_available():
        torch.cuda.set_rng_state(r["cuda"])
    data_rng.bit_generator.state = ckpt["data"]["rng"]
    return ckpt


@torch.no_grad()
def _my_estimate(model, tokens, batch_size, block_size, device, iters, seed, ctx):
    rng = np.random.default_rng(seed)  # its own stream: evaluating never moves the training batches
    model.eval()
    losses = []
    for _ in range(iters):
        x, y = my_get_batch(tokens, batch_size, block_size, device, rng)
        with ctx:
            losses.append(float(model(x, y)[1]))
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def _my_whole_split(model, tokens, batch_size, block_size, device, ctx):
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    n_full = (len(ids) - 1) // block_size  # windows of block_size targets; every token after the first is one
    x_all = ids[:n_full * block_size].view(n_full, block_size)
    y_all = ids[1:n_full * block_size + 1].view(n_full, block_size)
    tail = (ids[None, n_full * block_size:-1], ids[None, n_full * block_size + 1:])
    chunks = [(x_all[i:i + batch_size], y_all[i:i + batch_size]) for i in range(0, n_full, batch_size)]
    model.eval()
    nll, count = 0.0, 0
    for x, y in chunks + ([tail] if tail[1].numel() else []):
        with ctx:
            nll += float(model(x.to(device), y.to(device))[1]) * y.numel()
        count += y.numel()
    model.train()
    return nll / count


def _my_step(model, optimizers, batches, s, scaler, ctx):
    from types import SimpleNamespace

    loss_sum = 0.0
    for x, y in batches:  # accumulate: gradients add up, so each loss is divided by the count
        with ctx:
            loss = model(x, y)[1] / len(batches)
        (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += loss.detach()
    params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
    if scaler:  # one unscale over all optimizers' groups, so one overflow check decides for both
        scaler.unscale_(SimpleNamespace(param_groups=[g for o in optimizers for g in o.param_groups]))
    norm = my_clip_grad_norm(params, s["grad_clip"]) if s["grad_clip"] else None
    for o in optimizers:
        scaler.step(o) if scaler else o.step()
        o.zero_grad(set_to_none=True)
    if scaler:
        scaler.update()
    return float(loss_sum), norm


def my_train(model, optimizers, data_dir, out_dir="out/my_run", *, max_iters=500, batch_size=16, grad_accum=1,
             lr=3e-3, min_lr=3e-4, warmup_iters=30, lr_decay_iters=None, grad_clip=1.0, eval_interval=100,
             eval_iters=10, log_interval=10, seed=0, device="cpu", dtype="float32", resume=False, final_eval=True):
    s = {k: v for k, v in locals().items() if k not in ("model", "optimizers")}  # the run's settings
    import contextlib
    import dataclasses
    import json
    import os
    import time
    from pathlib import Path

    import yaml

    s["data_dir"], s["out_dir"] = str(data_dir), str(out_dir)
    out, block = Path(out_dir), model.config.block_size
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    train_tokens = np.memmap(Path(data_dir) / "train.bin", dtype=meta["dtype"], mode="r")
    val_tokens = np.memmap(Path(data_dir) / "val.bin", dtype=meta["dtype"], mode="r")
    ctx = (torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype)) if dtype != "float32"
           else contextlib.nullcontext())
    scaler = MyScaler() if dtype == "float16" else None  # fp16 overflows without loss scaling; bf16 does not
    out.mkdir(parents=True, exist_ok=True)
    rng, step, best = np.random.default_rng(seed), 0, float("inf")
    if resume and (out / "ckpt.pt").is_file():
        ckpt = my_load_checkpoint(out / "ckpt.pt", model, optimizers, rng)
        step, best = ckpt["step"], ckpt["best_val_loss"]
    elif (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # a fresh run starts a fresh log
    tmp = out / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(s, sort_keys=False))
    os.replace(tmp, out / "config.yaml")
    kinds = ",".join(f"{type(o).__module__}.{type(o).__qualname__}" for o in optimizers)
    fields = {"config": {"model": dataclasses.asdict(model.config), "train": s}, "meta": meta,
              "extra": {"trainer": "learner", "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
                        "optimizer_class": kinds}}

    def record(row):
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    t0, seen, last = time.perf_counter(), 0, {}
    while step < max_iters:
        rate = my_lr(step, warmup_iters, lr_decay_iters or max_iters, lr, min_lr)
        for o in optimizers:
            for g in o.param_groups:  # every group keeps its own peak and follows one schedule
                g["lr"] = g.get("peak_lr", lr) * rate / lr
        batches = [my_get_batch(train_tokens, batch_size, block, device, rng) for _ in range(grad_accum)]
        loss, _ = _my_step(model, optimizers, batches, s, scaler, ctx)
        step, seen = step + 1, seen + batch_size * block * grad_accum
        if step % log_interval == 0 or step == max_iters:
            record({"step": step, "loss": loss, "lr": rate, "tokens_per_s": seen / (time.perf_counter() - t0),
                    "mfu": None})
            t0, seen = time.perf_counter(), 0
        if step % eval_interval == 0 or step == max_iters:
            ev = [_my_estimate(model, d, batch_size, block, device, eval_iters, seed + 1, ctx)
                  for d in (train_tokens, val_tokens)]
            last = {"train_loss": ev[0], "val_loss": ev[1], "val_ppl": math.exp(ev[1])}
            best = min(best, ev[1])
            record({"step": step, **last})
            my_save_checkpoint(out / "ckpt.pt", model, optimizers, step, rng, best_val_loss=best, **fields)
            t0 = time.perf_counter()  # evaluation time is not training throughput
    result = {"step": step, "best_val_loss": best, **last}
    if final_eval:
        from minilm.data import baseline_losses

        base = baseline_losses(data_dir, meta["vocab_size"])
        result.update(final_val_loss=_my_whole_split(model, val_tokens, batch_size, block, device, ctx),
                      bigram_val_loss=base["bigram"]["val_loss"], unigram_val_loss=base["unigram"]["val_loss"])
        record({"step": step, **{k: result[k] for k in ("final_val_loss", "bigram_val_loss", "unigram_val_loss")}})
    return result


# ----------------------------------------------------------------------------- week 18: your own ablation


def _my_variant_run(config, opt_args, data_dir, out, steps, train_kw):
    import json
    import statistics
    from pathlib import Path

    torch.manual_seed(train_kw.get("seed", 0))  # every variant starts from the same seed
    model = MyGPT(config, checkpoint=my_checkpoint)
    result = my_train(model, my_optimizers(model, *opt_args), data_dir, out, **{
        **train_kw, "max_iters": steps, "lr_decay_iters": steps, "eval_interval": steps})
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    return result["final_val_loss"], statistics.median(rates[1:] or rates), sum(p.numel() for p in model.parameters())


def my_ablation(variants, config, opt_args, data_dir, out_root, tokens, seconds, train_kw):
    import dataclasses
    from pathlib import Path

    per_step = train_kw["batch_size"] * train_kw.get("grad_accum", 1) * config.block_size
    rows = []
    for i, (name, changes) in enumerate(variants.items()):
        cfg = dataclasses.replace(config, **changes)
        steps = max(1, tokens // per_step)
        runs = Path(out_root) / f"v{i}-tokens", Path(out_root) / f"v{i}-time"
        loss_tokens, tok_s, params = _my_variant_run(cfg, opt_args, data_dir, runs[0], steps, train_kw)
        time_steps = max(1, round(seconds * tok_s / per_step))  # the steps this variant makes in `seconds`
        loss_time, _, _ = _my_variant_run(cfg, opt_args, data_dir, runs[1], time_steps, train_kw)
        rows.append({"variant": name, "changes": dict(changes), "params": params, "tokens_per_s": tok_s,
                     "equal_tokens": {"steps": steps, "val_loss": loss_tokens, "run": str(runs[0])},
                     "equal_time": {"steps": time_steps, "val_loss": loss_time, "run": str(runs[1])}})
    return rows


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


# ----------------------------------------------------------------------------- week 17: checkpointing and DDP


class MyCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, *args):
        ctx.fn, ctx.rng = fn, torch.get_rng_state()
        ctx.amp = {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")}
        ctx.cuda = [a.device for a in args if torch.is_tensor(a) and a.is_cuda][:1]
        ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in ctx.cuda]
        ctx.is_tensor = [torch.is_tensor(a) for a in args]
        ctx.others = [None if t else a for a, t in zip(args, ctx.is_tensor)]
        ctx.save_for_backward(*[a for a in args if torch.is_tensor(a)])
        with torch.no_grad():  # no graph: the block's activations are dropped as soon as they are used
            return fn(*args)

    @staticmethod
    def backward(ctx, *grad_outputs):
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved).detach().requires_grad_(True) if t else o for t, o in zip(ctx.is_tensor, ctx.others)]
        with torch.random.fork_rng(devices=ctx.cuda):  # the same dropout masks; the outer stream left where it was
            torch.set_rng_state(ctx.rng)
            for d, state in zip(ctx.cuda, ctx.cuda_rng):
                torch.cuda.set_rng_state(state, d)
            (cpu_on, cpu_dtype), (cuda_on, cuda_dtype) = ctx.amp["cpu"], ctx.amp["cuda"]
            # backward runs outside the training's autocast: recompute in the precision of the first pass
            with torch.enable_grad(), torch.autocast("cpu", cpu_dtype, enabled=cpu_on), \
                    torch.autocast("cuda", cuda_dtype, enabled=cuda_on):
                out = ctx.fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs) if torch.is_tensor(o) and o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, *[a.grad if torch.is_tensor(a) else None for a in inputs])


def my_checkpoint(fn, *args):
    return MyCheckpoint.apply(fn, *args)


def my_all_reduce_grads(model, world_size):
    import torch.distributed as dist

    for p in model.parameters():
        if p.grad is not None:  # frozen parameters have no gradient, on every rank alike
            dist.all_reduce(p.grad)  # in place: the sum over ranks (gloo has no AVG)
            p.grad.div_(world_size)


# ----------------------------------------------------------------------------- week 18: attention in tiles


def my_flash_attention(q, k, v, block=64):
    b, h, t, d = q.shape
    out = torch.empty_like(q)
    for start in range(0, t, block):  # one tile of queries at a time
        qi = q[:, :, start:start + block] / math.sqrt(d)
        rows = torch.arange(start, start + qi.size(2), device=q.device).unsqueeze(1)
        m = qi.new_full(qi.shape[:-1] + (1,), float("-inf"))  # running max of each row's scores
        denom = torch.zeros_like(m)
        acc = torch.zeros_like(qi)
        for ks in range(0, min(start + block, t), block):  # key tiles after this query tile are all masked
            scores = qi @ k[:, :, ks:ks + block].transpose(-2, -1)
            cols = torch.arange(ks, ks + scores.size(-1), device=q.device).unsqueeze(0)
            scores = scores.masked_fill(cols > rows, float("-inf"))
            m_next = torch.maximum(m, scores.max(dim=-1, keepdim=True).values)
            weights = torch.exp(scores - m_next)
            shrink = torch.exp(m - m_next)  # earlier tiles were weighted against a smaller max
            denom = denom * shrink + weights.sum(dim=-1, keepdim=True)
            acc = acc * shrink + weights @ v[:, :, ks:ks + block]
            m = m_next
        out[:, :, start:start + block] = acc / denom
    return out


# ----------------------------------------------------------------------------- week 18: baselines and intervals


def my_addk_bigram(train_ids, heldout_ids, eval_ids, vocab_size, ks):
    train = np.asarray(train_ids, dtype=np.int64)
    # pair counts kept sparse (V * V does not fit for a real vocabulary): sorted keys a * V + b and their counts
    keys, counts = np.unique(train[:-1] * vocab_size + train[1:], return_counts=True)
    ctx = np.bincount(train[:-1], minlength=vocab_size).astype(np.float64)

    def loss(ids, k):
        ids = np.asarray(ids, dtype=np.int64)
        a, b = ids[:-1], ids[1:]
        want = a * vocab_size + b
        pos = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
        c = np.where(keys[pos] == want, counts[pos], 0).astype(np.float64)
        return float(np.mean(np.log(ctx[a] + k * vocab_size) - np.log(c + k)))

    held = [loss(heldout_ids, k) for k in ks]
    best = ks[held.index(min(held))]
    return best, loss(eval_ids, best)


def my_bootstrap_ci(values, clusters, n_resamples, seed, alpha):
    x = np.asarray(values, dtype=np.float64)
    names = sorted(set(clusters))
    index = {c: i for i, c in enumerate(names)}
    which = np.array([index[c] for c in clusters])
    sums = np.bincount(which, weights=x, minlength=len(names))
    sizes = np.bincount(which, minlength=len(names)).astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for r in range(n_resamples):
        idx = rng.integers(0, len(names), len(names))
        means[r] = sums[idx].sum() / sizes[idx].sum()
    low, high = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


# ----------------------------------------------------------------------------- week 17: decontamination


def _my_words(text):
    import re
    import unicodedata

    text = text.lower()
    if not text.isascii():  # accents: NFKD splits "é" into "e" and a combining mark, which goes
        text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    text = re.sub(r"\d", "0", text)
    return re.sub(r"[\W_]+", " ", text).split()  # anything but a letter or digit separates words


def my_decontaminate(docs, stats, eval_texts=(), ngram=13, min_fraction=0.1):
    def grams(text):
        words = _my_words(text)
        return [tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]

    # one set per kind of held-out text, filled document by document: no n-gram spans two documents
    val_bank, eval_bank = set(), set()
    for doc in docs:
        if doc.get("split") == "val":
            val_bank.update(grams(doc["text"]))
    for text in eval_texts:
        eval_bank.update(grams(text))
    kept = []
    for doc in docs:
        if doc.get("split") == "val":
            kept.append(stats.keep(len(doc["text"]), doc))
            continue
        mine = grams(doc["text"])  # every position counts: an n-gram repeated three times is three hits
        in_eval = sum(g in eval_bank for g in mine)
        in_val = sum(g in val_bank for g in mine)
        if in_eval > 0:
            stats.remove(doc, "contaminated_eval", f"{in_eval} {ngram}-grams shared with the evaluation texts")
        elif mine and in_val / len(mine) >= min_fraction:
            stats.remove(doc, "overlaps_val", f"{in_val} of its {len(mine)} {ngram}-grams occur in val")
        else:
            kept.append(stats.keep(len(doc["text"]), doc))
    return kept


# ----------------------------------------------------------------------------- week 18: a KV cache for my model


def my_rope_at(x, theta, start):
    t, hd = x.size(-2), x.size(-1)
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=x.device) / hd)
    pos = torch.arange(start, start + t, dtype=torch.float32, device=x.device)  # where these rows sit
    angles = torch.cat([pos[:, None] * inv_freq[None, :]] * 2, dim=-1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * torch.cos(angles) + torch.cat([-x2, x1], dim=-1) * torch.sin(angles)


def my_kv_cache(model, batch=1):
    cfg = model.config
    shape = (batch, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
    w = model.lm_head.weight  # same device and dtype as the model
    return [(w.new_zeros(shape), w.new_zeros(shape)) for _ in range(cfg.n_layer)]


def _my_norm(model, x, layer):
    if model.config.norm == "rmsnorm":
        return my_rms_norm(x, layer.weight, layer.eps)
    return my_layer_norm(x, layer.weight, layer.bias, layer.eps)


def my_attend_cache(q, k, v, start):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    rows = torch.arange(start, start + q.size(2), device=q.device)[:, None]  # the queries' own positions
    scores = scores.masked_fill(torch.arange(k.size(2), device=q.device)[None, :] > rows, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@torch.no_grad()
def my_forward_cached(model, idx, cache, start):
    cfg, tr = model.config, model.transformer
    b, t = idx.shape
    end = start + t
    x = tr.wte(idx)
    if cfg.pos == "learned":
        x = x + tr.wpe(torch.arange(start, end, device=idx.device))
    for layer, blk in enumerate(tr.h):
        attn = blk.attn
        qkv = attn.c_attn(_my_norm(model, x, blk.ln_1)).split(cfg.n_embd, dim=2)
        q, k, v = (z.view(b, t, cfg.n_head, -1).transpose(1, 2) for z in qkv)
        if cfg.qk_norm:
            q, k = my_rms_norm(q, attn.q_norm.weight, attn.q_norm.eps), my_rms_norm(k, attn.k_norm.weight,
                                                                                     attn.k_norm.eps)
        if cfg.pos == "rope":
            q, k = my_rope_at(q, cfg.rope_theta, start), my_rope_at(k, cfg.rope_theta, start)
        keys, values = cache[layer]
        keys[:, :, start:end], values[:, :, start:end] = k, v
        if start == 0:  # the prompt: causal attention over itself, in tiles, so a long one never builds T x T
            y = my_flash_attention(q, k, v)
        else:  # new positions against everything cached so far, their own keys included
            y = my_attend_cache(q, keys[:, :, :end], values[:, :, :end], start)
        x = x + attn.c_proj(y.transpose(1, 2).reshape(b, t, cfg.n_embd))
        x = x + my_mlp(_my_norm(model, x, blk.ln_2), blk.mlp, cfg.mlp)
    return model.lm_head(_my_norm(model, x, tr.ln_f))


@torch.no_grad()
def my_generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None):
    ids = prompt_ids.to(model.lm_head.weight.device)
    if ids.size(1) + max_new_tokens > model.config.block_size:
        raise ValueError(f"{ids.size(1)} prompt + {max_new_tokens} new tokens do not fit in block_size "
                         f"{model.config.block_size}")
    cache = my_kv_cache(model, ids.size(0))
    logits = my_forward_cached(model, ids, cache, 0)[:, -1]
    out = [ids]
    for i in range(max_new_tokens):
        if temperature == 0:
            token = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = my_probs(logits.float(), temperature, top_k, top_p)
            token = torch.multinomial(probs, 1, generator=generator)
        out.append(token)
        if i + 1 < max_new_tokens:  # the last token needs no forward pass: nothing comes after it
            logits = my_forward_cached(model, token, cache, ids.size(1) + i)[:, -1]
    return torch.cat(out, dim=1)
