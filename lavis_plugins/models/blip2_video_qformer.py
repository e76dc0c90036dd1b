"""Zero-shot text-video retrieval with the stage-1 BLIP-2 model: ``lp_blip2_video_qformer``.

A subclass of ``lp_blip2_qformer`` with the same weights and checkpoints and no new parameters.
A video ``(B, C, T, H, W)`` is read as T frames, each through the frozen image encoder and the
Q-Former, and scored against text in the two steps of BLIP-2's retrieval inference:

1. ITC similarity, for candidate selection: for each frame, the image-text similarity of
   BLIP-2 (the max over the Nq query embeddings of their cosine similarity with the text [CLS]
   embedding); the video's similarity is the **mean over frames** of these per-frame values.
   The mean (not the max) keeps every frame's evidence: a caption describes the whole clip.
2. ITM re-ranking of the ``k_test`` best candidates: the ITM pass runs with the **concatenated
   image features of all frames** (B, T * N, Dv) as the Q-Former's cross-attention memory, so the
   queries and the text see every frame at once (BLIP's "concatenate the frames' features").
   The T * Nq query outputs could not serve: the cross-attention layers read image-encoder
   features (width Dv, e.g. 1408), not Q-Former outputs (width 768); and with concatenated
   features a 1-frame video scores exactly as its image.

The final score of a pair is ``itm + itc`` (LAVIS's ``compute_sim_matrix``); pairs that were not
re-ranked score -100.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from torch import Tensor

from lavis_plugins.common import dist
from lavis_plugins.common.errors import UserError, unknown_name
from lavis_plugins.models._video_frames import check_video, flatten_frames
from lavis_plugins.models.blip2_qformer import Blip2Stage1Output, LPBlip2Qformer
from lavis_plugins.models.qformer import padding_mask
from lavis_plugins.paths import config_path

logger = logging.getLogger(__name__)

DEFAULT_K_TEST = 128  # candidates re-ranked by ITM per video and per text (BLIP-2's k)
NOT_RERANKED = -100.0  # score of a pair outside the ITC top-k (as LAVIS)
_TEXT_CHUNK = 4096  # texts per similarity matmul (bounds memory with many captions)
_ITM_CHUNK = 64  # (video, text) pairs per ITM pass


@registry.register_model("lp_blip2_video_qformer")
class LPBlip2VideoQformer(LPBlip2Qformer):
    """``lp_blip2_qformer`` scoring texts against videos by frame sampling (module docstring).

    Model types: those of ``lp_blip2_qformer`` (same weights), each YAML with the video
    processors.
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        t: config_path(f"models/lp_blip2_video_qformer_{t}.yaml")
        for t in LPBlip2Qformer.PRETRAINED_MODEL_CONFIG_DICT
    }

    @classmethod
    def default_config_path(cls, model_type: str) -> str:
        if model_type not in cls.PRETRAINED_MODEL_CONFIG_DICT:
            raise unknown_name("model_type of lp_blip2_video_qformer", model_type,
                               cls.PRETRAINED_MODEL_CONFIG_DICT)
        return cls.PRETRAINED_MODEL_CONFIG_DICT[model_type]

    # ------------------------------------------------------------------ features
    def forward(self, samples: Mapping[str, Any], match_head: Optional[str] = None
                ) -> Blip2Stage1Output:
        """Image-text training (or ``match_head`` scoring) as ``lp_blip2_qformer``
        (``samples["image"]``); videos are for zero-shot evaluation only."""
        if "video" in samples:
            raise UserError("lp_blip2_video_qformer evaluates videos zero-shot and does not train "
                            "on them; train lp_blip2_qformer on images and load its checkpoint")
        return super().forward(samples, match_head=match_head)

    def video_features(self, video: Tensor) -> Tuple[Tensor, Tensor]:
        """Videos (B, C, T, H, W) -> per-frame ITC embeddings (B, T, Nq, E), L2-normalised, and
        the frames' image features concatenated in time order (B, T * N, Dv) (ITM memory)."""
        b, _, t = check_video(video, "a video batch").shape[:3]
        image_embeds = self.encode_image(flatten_frames(video))  # (B*T, N, Dv), row b*T + t
        query = self.query_output(image_embeds)  # (B*T, Nq, D)
        feats = F.normalize(self.vision_proj(query), dim=-1)
        feats = feats.reshape(b, t, *feats.shape[1:])  # (B, T, Nq, E)
        memory = image_embeds.reshape(b, t * image_embeds.shape[1], image_embeds.shape[2])
        return feats, memory

    def text_features(self, texts: Sequence[str]) -> Tuple[Tensor, Tensor, Tensor]:
        """Captions -> (input ids (Nt, L), attention mask (Nt, L), [CLS] ITC embeddings (Nt, E),
        L2-normalised)."""
        tokens = self.tokenize(list(texts))
        feats = []
        for s in range(0, tokens.input_ids.shape[0], 256):
            part = type(tokens)({k: v[s:s + 256] for k, v in tokens.items()})
            feats.append(F.normalize(self.text_proj(self.forward_text(part)), dim=-1))
        return tokens.input_ids, tokens.attention_mask, torch.cat(feats)

    @staticmethod
    def video_text_similarity(frame_feats: Tensor, text_feats: Tensor) -> Tensor:
        """ITC similarity (B, Nt): per frame the max over queries of the cosine similarity, then
        the mean over frames. frame_feats (B, T, Nq, E), text_feats (Nt, E)."""
        out = []
        for s in range(0, text_feats.shape[0], _TEXT_CHUNK):
            sim = torch.einsum("btqe,ne->btqn", frame_feats, text_feats[s:s + _TEXT_CHUNK])
            out.append(sim.max(dim=2).values.mean(dim=1))  # (B, chunk)
        return torch.cat(out, dim=1)

    def itm_scores(self, memory: Tensor, rows: Tensor, text_ids: Tensor, text_atts: Tensor,
                   kv: Any = None) -> Tensor:
        """Matched-logit ITM scores (P,) (LAVIS's ``compute_itm``) of P pairs: text p with video
        ``rows[p]`` of ``memory`` (V, T * N, Dv); each video's keys/values are computed once
        (``kv``: ``Qformer.bert.image_kv(memory)`` when the caller already has it)."""
        kv = self.Qformer.bert.image_kv(memory) if kv is None else kv
        hidden, _ = self.Qformer.bert(
            input_ids=text_ids, query_embeds=self.query_tokens.expand(text_ids.shape[0], -1, -1),
            attention_mask=padding_mask(text_atts, self.num_query), image_kv=kv,
            image_index=rows)
        return self.itm_head(hidden[:, :self.num_query]).mean(1)[:, 1]

    # ------------------------------------------------------------------ frame selection
    def frame_query_output(self, image_embeds: Tensor) -> Tensor:
        """``query_output`` of many frames: image features (F, N, Dv) -> query outputs
        (F, Nq, D), with the first layer's self-attention computed once for all frames.

        Its input is the learned queries, the same for every frame (the image enters at that
        layer's cross-attention, after it), so its output is too: computing it once saves about
        7% of the selector's Q-Former work per frame. In training the dropout differs per frame:
        then, and for a single frame, this is ``query_output``. Equal to ``query_output`` within
        float rounding (tests/test_video_frame_selection.py).
        """
        frames, nq = image_embeds.shape[0], self.query_tokens.shape[1]
        if self.training or frames == 1:
            return self.query_output(image_embeds)
        bert = self.Qformer.bert
        kv = bert.image_kv(image_embeds, nq)  # folded where cheaper, as ``query_output``
        first, *rest = bert.encoder.layer
        queries = bert.embeddings(None, self.query_tokens)  # (1, Nq, D)
        h = first.self_attend(queries)[0].expand(frames, -1, -1)  # (F, Nq, D), one copy in memory
        h = first.feed_forward(h, nq, [(kv.layers[0], 1)] if first.has_cross_attention else None)
        for i, layer in enumerate(rest, start=1):
            h = layer(h, nq, None, None, [(kv.layers[i], 1)] if layer.has_cross_attention
                      else None)[0]
        return h

    @torch.no_grad()
    def frame_text_scores(self, frame_embeds: Tensor, texts: Sequence[Sequence[str]],
                          method: str = "itm", aggregate: str = "best", itm_pool: int = 0
                          ) -> Tensor:
        """How well each frame matches its video's texts (question, or question + option):
        (B, T), aggregated over the video's texts (``_frame_selection`` module docstring).

        Args:
            frame_embeds: image features (B, T, N, Dv), ``ln_vision`` applied (``encode_image``).
            texts: for each of the B videos, one or more texts.
            method: "itc" (contrastive similarity) or "itm" (matched logit).
            aggregate: "best" (the maximum over a video's texts) or "spread" (maximum - mean).
            itm_pool: "itm" only: when > 0, ITC scores every frame and ITM re-ranks only the
                ``itm_pool`` frames of each video that ITC scores best (BLIP-2's retrieval
                re-ranks ITC's ``k_test`` best the same way); the others score -inf. 0: ITM
                scores every frame.
        """
        from lavis_plugins.models._frame_selection import (
            check_aggregate,
            gather_frames,
            own_pairs,
            per_frame_scores,
            top_k_in_time_order,
        )

        b, t, n, dv = frame_embeds.shape
        if len(texts) != b:
            raise UserError(f"{len(texts)} text lists for {b} videos")
        if method not in ("itc", "itm"):
            raise unknown_name("frame scoring method", method, ("itc", "itm"))
        check_aggregate(texts, aggregate)
        flat = [x for ts in texts for x in ts]
        text_ids, text_atts, text_feats = self.text_features(flat)
        if method == "itm" and itm_pool <= 0:
            return self._itm_frame_scores(frame_embeds, texts, text_ids, text_atts, aggregate)
        embeds = frame_embeds.reshape(b * t, n, dv)
        # only the pairs (frame of video b, text of video b): P = T * sum_b(texts of b)
        rows, cols = own_pairs(texts, t, embeds.device)
        feats = F.normalize(self.vision_proj(self.frame_query_output(embeds)), dim=-1)
        sims = torch.einsum("fqe,ne->fqn", feats, text_feats).max(dim=1).values  # (B*T, Nt)
        itc = per_frame_scores(sims[rows, cols], rows, b, t, aggregate)  # (B, T)
        if method == "itc":
            return itc
        pool = top_k_in_time_order(itc, itm_pool)  # (B, m): ITC's best, in time order
        itm = self._itm_frame_scores(gather_frames(frame_embeds, pool), texts, text_ids,
                                     text_atts, aggregate)  # (B, m)
        return torch.full_like(itc, float("-inf")).scatter(1, pool, itm)

    def _itm_frame_scores(self, frame_embeds: Tensor, texts: Sequence[Sequence[str]],
                          text_ids: Tensor, text_atts: Tensor, aggregate: str) -> Tensor:
        """(B, T) ITM matched logits of frames (B, T, N, Dv) with their video's texts (token
        ids / masks (Nt, L) of the flattened texts), aggregated per frame."""
        from lavis_plugins.models._frame_selection import own_pairs, per_frame_scores

        b, t, n, dv = frame_embeds.shape
        embeds = frame_embeds.reshape(b * t, n, dv)
        rows, cols = own_pairs(texts, t, embeds.device)
        kv = self.Qformer.bert.image_kv(embeds)  # each frame's keys/values once
        scores = torch.cat([self.itm_scores(embeds, rows[s:s + _ITM_CHUNK],
                                            text_ids[cols[s:s + _ITM_CHUNK]],
                                            text_atts[cols[s:s + _ITM_CHUNK]], kv)
                            for s in range(0, rows.shape[0], _ITM_CHUNK)])  # (P,)
        return per_frame_scores(scores, rows, b, t, aggregate)

    @torch.no_grad()
    def select_frames(self, video: Tensor, texts: Sequence[Any], k: int,
                      method: str = "itm", aggregate: str = "best", itm_pool: int = 0
                      ) -> Tensor:
        """Indices (B, min(k, T)) of the ``k`` frames of each video (B, C, T, H, W) that best
        match its text(s) (a string or a list of strings per video), in time order;
        ``aggregate`` and ``itm_pool`` as ``frame_text_scores``."""
        from lavis_plugins.models._frame_selection import top_k_in_time_order

        b, _, t = check_video(video, "a video batch").shape[:3]
        embeds = self.encode_image(flatten_frames(video))
        texts = [[x] if isinstance(x, str) else list(x) for x in texts]
        scores = self.frame_text_scores(embeds.reshape(b, t, *embeds.shape[1:]), texts, method,
                                        aggregate, itm_pool)
        return top_k_in_time_order(scores, k)

    # ------------------------------------------------------------------ retrieval
    @torch.no_grad()
    def compute_sim_matrix(self, data_loader, task_cfg: Optional[Mapping[str, Any]] = None,
                           return_skipped: bool = False):
        """Video-to-text and text-to-video score matrices over ``data_loader.dataset``.

        The dataset provides ``text`` (all captions) and yields ``{"video", "index"}`` batches
        (``lp_msrvtt_retrieval`` eval split); under the runner each process sees its own share
        of the videos. Every process encodes all captions; ITC similarities of all videos are
        gathered; each process re-ranks with ITM the pairs whose video it holds (video
        features never leave their process); the scores are merged.

        Args:
            data_loader: loader of the evaluation dataset (this process's share of it).
            task_cfg: the run config; ``k_test`` (default 128) candidates are re-ranked.
            return_skipped: also return the skip records of videos that could not be read
                (``on_bad_video: skip``); their rows / columns are -inf.
        Returns:
            ``(score_i2t (V, Nt), score_t2i (Nt, V))`` numpy arrays on every process (plus the
            skip records when ``return_skipped``).
        """
        k_test = int((task_cfg or {}).get("k_test", DEFAULT_K_TEST))
        dataset = data_loader.dataset
        num_videos, texts = len(dataset), list(dataset.text)
        text_ids, text_atts, text_feats = self.text_features(texts)

        local_index: List[int] = []
        local_sims, local_memory, skipped = [], [], []
        for samples in data_loader:
            skipped.extend(samples.get("skipped", []) or [])
            if "video" not in samples:
                continue
            feats, memory = self.video_features(samples["video"].to(self.device))
            local_sims.append(self.video_text_similarity(feats, text_feats).float().cpu())
            local_memory.extend(memory.cpu().unbind(0))  # ITM memory waits on the CPU (as LAVIS)
            idx = samples["index"]
            local_index.extend(int(i) for i in (idx.tolist() if torch.is_tensor(idx) else idx))

        sims = torch.full((num_videos, len(texts)), -math.inf)
        all_skipped = []
        for index, part, skip in dist.all_gather_object(
                (local_index, torch.cat(local_sims) if local_sims else None, skipped)):
            if part is not None:
                sims[index] = part
            all_skipped.extend(skip)
        score_i2t, score_t2i = self._rerank(sims, local_index, local_memory, text_ids, text_atts,
                                            k_test)
        out = (score_i2t.numpy(), score_t2i.numpy())
        return (*out, all_skipped) if return_skipped else out

    def _rerank(self, sims: Tensor, local_index: List[int], local_memory: List[Tensor],
                text_ids: Tensor, text_atts: Tensor, k_test: int) -> Tuple[Tensor, Tensor]:
        """ITM + ITC scores of the ITC top-k pairs in both directions; -100 elsewhere, -inf for
        videos without features (skipped)."""
        num_videos, num_texts = sims.shape
        present = torch.isfinite(sims[:, 0]) if num_texts else torch.zeros(num_videos, dtype=bool)
        k_texts = min(k_test, num_texts)
        k_videos = min(k_test, int(present.sum()))
        # the pairs each direction re-ranks, as {video: set(texts)}
        pairs: Dict[int, set] = {}
        for v in range(num_videos):
            if present[v] and k_texts:
                pairs.setdefault(v, set()).update(sims[v].topk(k_texts).indices.tolist())
        t2i_top = sims.t().topk(k_videos, dim=1).indices if k_videos else None  # (Nt, k)
        if t2i_top is not None:
            for t, videos in enumerate(t2i_top.tolist()):
                for v in videos:
                    pairs.setdefault(v, set()).add(t)
        # this process scores the pairs of its own videos
        mine = {v: i for i, v in enumerate(local_index)}
        scored: List[Tuple[int, int, float]] = []
        for v, row in mine.items():
            ts = sorted(pairs.get(v, ()))
            memory = local_memory[row].to(self.device)[None]  # (1, T*N, Dv)
            for s in range(0, len(ts), _ITM_CHUNK):
                chunk = torch.tensor(ts[s:s + _ITM_CHUNK], device=self.device)
                itm = self.itm_scores(memory, torch.zeros_like(chunk), text_ids[chunk],
                                      text_atts[chunk]).float().cpu()
                scored.extend((v, t, float(x)) for t, x in zip(chunk.tolist(), itm.tolist()))
        itm_all = {}
        for part in dist.all_gather_object(scored):
            itm_all.update({(v, t): x for v, t, x in part})

        score_i2t = torch.full((num_videos, num_texts), NOT_RERANKED)
        score_t2i = torch.full((num_texts, num_videos), NOT_RERANKED)
        for v in range(num_videos):
            if present[v] and k_texts:
                for t in sims[v].topk(k_texts).indices.tolist():
                    score_i2t[v, t] = itm_all[(v, t)] + sims[v, t]
        if t2i_top is not None:
            for t, videos in enumerate(t2i_top.tolist()):
                for v in videos:
                    score_t2i[t, v] = itm_all[(v, t)] + sims[v, t]
        score_i2t[~present] = -math.inf
        score_t2i[:, ~present] = -math.inf
        return score_i2t, score_t2i
