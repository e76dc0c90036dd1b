#!/usr/bin/env bash
# Reproduction recipes for zero-shot video benchmarks, given the public weights and data.
# Usage: NPROC=8 WEIGHTS=/weights DATA=/data run_scripts/video_reproduce.sh RECIPE
#   RECIPE: msvd_blip | msrvtt_blip | msvd_instructblip | msrvtt_instructblip | msrvtt_retrieval
#           | nextqa_sevila
# Each YAML names the number it should reproduce and where that number comes from (its header).
#   msvd_blip / msrvtt_blip: BLIP-2 FlanT5-XL, 16 uniform frames, both protocols (generate: BLIP's
#     open-ended exact match, BLIP reports 35.2 / 19.2; rank: InstructBLIP's candidate ranking,
#     33.7 / 16.2 for BLIP-2 FlanT5-XL)
#   msvd_instructblip / msrvtt_instructblip: InstructBLIP's video protocol (4 headtail frames,
#     beam 5, length penalty -1, "Question: {} Short Answer:"): BLIP-2 FlanT5-XL 33.7 / 16.2
#   msrvtt_retrieval: BLIP's zero-shot text->video protocol (8 frames, k = 128 ITC candidates
#     re-ranked by ITM); BLIP reports R@1 43.3
#   nextqa_sevila: SeViLA-style NExT-QA (32 candidates, 4 kept, "Frame {i}:"), SeViLA 63.6 with its
#     trained localizer; here the answering LLM selects frames zero-shot
set -euo pipefail
W="${WEIGHTS:-/weights}"
D="${DATA:-/data}"
COMMON_T5=(model.vit_path="$W/eva_vit_g.pth" model.bert_path="$W/bert-base-uncased"
           model.t5_model="$W/flan-t5-xl" model.pretrained="$W/blip2_pretrained_flant5xl.pth")
run() { exec torchrun --nproc_per_node="${NPROC:-1}" -m lavis_plugins.cli evaluate --cfg-path "$@"; }
case "${1:-}" in
  msvd_blip) run projects/blip2_video/msvd_qa_flant5xl_16f.yaml --options "${COMMON_T5[@]}" \
      datasets.lp_msvd_qa.build_info.videos.storage="$D/msvd/videos" ;;
  msrvtt_blip) run projects/blip2_video/msrvtt_qa_flant5xl_16f.yaml --options "${COMMON_T5[@]}" \
      datasets.lp_msrvtt_qa.build_info.videos.storage="$D/msrvtt/videos" ;;
  msvd_instructblip) run projects/blip2_video/msvd_qa_flant5xl_instructblip_protocol.yaml \
      --options "${COMMON_T5[@]}" datasets.lp_msvd_qa.build_info.videos.storage="$D/msvd/videos" ;;
  msrvtt_instructblip) run projects/blip2_video/msrvtt_qa_flant5xl_instructblip_protocol.yaml \
      --options "${COMMON_T5[@]}" datasets.lp_msrvtt_qa.build_info.videos.storage="$D/msrvtt/videos" ;;
  msrvtt_retrieval) run projects/blip2_video/msrvtt_retrieval_zeroshot.yaml --options \
      model.vit_path="$W/eva_vit_g.pth" model.bert_path="$W/bert-base-uncased" \
      model.finetuned="$W/blip2_finetune_coco.pth" \
      datasets.lp_msrvtt_retrieval.build_info.videos.storage="$D/msrvtt/videos" ;;
  nextqa_sevila) run projects/blip2_video/nextqa_mc_flant5xl_select4of32.yaml --options \
      "${COMMON_T5[@]}" datasets.lp_nextqa.build_info.videos.storage="$D/nextqa/videos" ;;
  *) sed -n 2,20p "$0"; exit 2 ;;
esac
