"""Beam search with transformers' semantics (length penalty on the generated length, its early-stop heuristic),
so the same ids come out. Always eager: its cache rows are reordered every step."""

from __future__ import annotations

import torch

from lmforge.decoding.sampling import (
    GenerationConfig,
    apply_repetition_penalty,
    ban_repeated_ngrams,
    check_request,
    seen_tokens,
    stop_ids,
)
from lmforge.decoding.step import DecodeRuntime
from lmforge.decoding.stepper import Stepper
from lmforge.model.transformer import Transformer


@torch.inference_mode()
def beam_search(model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                gc: GenerationConfig | None = None) -> list[list[int]]:
    """Beam search with transformers' semantics (length penalty on the generated length, its early-stop
    heuristic), so the same ids come out. Returns the best hypothesis' new tokens per row."""
    gc = gc or GenerationConfig(num_beams=4)
    check_request(model, input_ids, gc)
    B, T = input_ids.shape
    nb, dev = gc.num_beams, input_ids.device
    stop = torch.tensor(stop_ids(model, gc), dtype=torch.long, device=dev)
    keep = max(2, 1 + stop.numel()) * nb  # candidates per row, so nb survive even if some finish
    top_nb = torch.arange(keep, device=dev) < nb  # (K,)
    NEG = -1.0e9

    ids = input_ids.repeat_interleave(nb, 0)  # (B*nb, T)
    mask = None if attention_mask is None else attention_mask.repeat_interleave(nb, 0)
    stepper = Stepper(DecodeRuntime(model), ids, mask, gc.max_new_tokens)
    max_new = gc.max_new_tokens
    run_seq = torch.zeros(B, nb, max_new, dtype=torch.long, device=dev)  # generated tokens of running beams
    run_score = torch.zeros(B, nb, device=dev)
    run_score[:, 1:] = NEG  # all beams start identical: only the first one may expand at step 0
    fin_seq = torch.zeros(B, nb, max_new, dtype=torch.long, device=dev)
    fin_len = torch.zeros(B, nb, dtype=torch.long, device=dev)
    fin_score = torch.full((B, nb), NEG, device=dev)
    fin_done = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    seen = seen_tokens(ids, mask, model.cfg.vocab_size) if gc.repetition_penalty != 1.0 else None

    logits = stepper.prefill(ids)  # (B*nb, V)
    V = logits.shape[-1]
    batch_off = (torch.arange(B, device=dev) * nb)[:, None]  # (B, 1)
    for step in range(max_new):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, gc.repetition_penalty)
        if gc.no_repeat_ngram_size:
            logits = ban_repeated_ngrams(logits, run_seq.view(B * nb, max_new)[:, :step], gc.no_repeat_ngram_size)
        logp = logits.log_softmax(-1).view(B, nb, V) + run_score[:, :, None]  # (B, nb, V)
        cand_score, cand_idx = torch.topk(logp.view(B, nb * V), keep)  # (B, K)
        cand_beam, cand_tok = cand_idx // V, cand_idx % V  # (B, K)
        cand_seq = run_seq.gather(1, cand_beam[:, :, None].expand(B, keep, max_new)).clone()  # (B, K, L)
        cand_seq[:, :, step] = cand_tok
        last = step == max_new - 1
        hits = torch.isin(cand_tok, stop) if stop.numel() else torch.zeros_like(cand_tok, dtype=torch.bool)
        if last:
            hits = torch.ones_like(hits)  # max length reached: every candidate is final
        # running beams for the next step: the best nb candidates that did not finish
        run_cand = cand_score + hits.float() * NEG
        nxt = torch.topk(run_cand, nb).indices  # (B, nb)
        run_seq = cand_seq.gather(1, nxt[:, :, None].expand(B, nb, max_new))
        run_score = run_cand.gather(1, nxt)
        src_beam = (cand_beam.gather(1, nxt) + batch_off).view(-1)  # (B*nb,) rows of the cache to keep
        # finished hypotheses: candidates among the top nb that hit a stop, scored with the length penalty
        just_done = hits & top_nb[None, :]
        fscore = cand_score / float(step + 1) ** gc.length_penalty
        full = fin_done.all(-1, keepdim=True) & gc.early_stopping
        fscore = fscore + full.float() * NEG + (~improvable).float() * NEG + (~just_done).float() * NEG
        m_seq = torch.cat([fin_seq, cand_seq], 1)
        m_score = torch.cat([fin_score, fscore], 1)
        m_len = torch.cat([fin_len, torch.full_like(cand_tok, step + 1)], 1)
        m_done = torch.cat([fin_done, just_done], 1)
        best = torch.topk(m_score, nb).indices  # (B, nb)
        fin_seq = m_seq.gather(1, best[:, :, None].expand(B, nb, max_new))
        fin_score, fin_len, fin_done = m_score.gather(1, best), m_len.gather(1, best), m_done.gather(1, best)
        # can a running beam still beat the worst finished one? (transformers' heuristic)
        best_possible = run_score[:, :1] / float(step + 1) ** gc.length_penalty
        worst = torch.where(fin_done, fin_score.min(1, keepdim=True).values, torch.full_like(fin_score, NEG))
        improvable = improvable & (best_possible > worst).any(-1, keepdim=True)
        if last or not bool(improvable.any()) or (gc.early_stopping and bool(fin_done.all())) or bool(hits.all()):
            break
        stepper.reorder(src_beam)
        if seen is not None:
            seen = seen.index_select(0, src_beam)
            seen[torch.arange(B * nb, device=seen.device), run_seq[:, :, step].reshape(-1)] = True
        logits = stepper.step(run_seq[:, :, step].reshape(-1))
    return [fin_seq[b, 0, : int(fin_len[b, 0])].tolist() for b in range(B)]
