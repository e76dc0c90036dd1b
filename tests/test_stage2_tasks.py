"""Stage-2 tasks and model behaviour: VQA accuracy against LAVIS's VQAEval, captioning metrics,
results files, VQA training targets, batched answers, answer ranking, and bad-input errors."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from lavis_plugins.common.errors import UserError

# answers chosen to exercise every normalisation rule: punctuation next to spaces or not, digit
# commas, decimals, number words, articles, contractions, case, newlines
NORMALISATION_CASES = [
    "Yes", "yes.", "two", "2", "the dog", "a Dog!", "dogs", "don't know", "dont", "3.5", "1,000",
    "1000", "red, white", "red white", "left-hand", "left hand", "none", "0", "it's (maybe)",
    "cat/dog", "a\nb", "  spaced  out ", "isnt", "ten", "Ten", "an apple", "o'clock", "oclock",
    "hello?!", "x.y.z", "end.", "#1", "$5", "5 $",
]



# ------------------------------------------------------------------ VQA metric vs LAVIS
def test_normalisation_equals_lavis():
    from lavis.common.vqa_tools.vqa_eval import VQAEval

    from lavis_plugins.common.vqa_eval import normalize_punctuation, normalize_words

    ref = VQAEval()
    for text in NORMALISATION_CASES + ["." * 40 + "a", "a. " * 40]:
        assert normalize_punctuation(text) == ref.processPunctuation(text), text
        assert normalize_words(text) == ref.processDigitArticle(text), text


def _lavis_vqa_accuracy(questions):
    """LAVIS's VQAEval on in-memory VQA/VQA-result stand-ins (the fields it reads)."""
    from lavis.common.vqa_tools.vqa_eval import VQAEval

    class _Qa:  # what VQAEval reads of lavis.common.vqa_tools.vqa.VQA
        def __init__(self, qa):
            self.qa = qa

        def getQuesIds(self):
            return list(self.qa)

    gts = {q: {"answers": [{"answer": a, "answer_id": i + 1, "answer_confidence": "yes"}
                           for i, a in enumerate(ans)],
               "question_type": "what", "answer_type": t}
           for q, (pred, ans, t) in questions.items()}
    res = {q: {"answer": pred} for q, (pred, ans, t) in questions.items()}
    ev = VQAEval(_Qa(copy.deepcopy(gts)), _Qa(res), n=2)
    ev.updateProgress = lambda *a: None
    ev.evaluate()
    return ev


def test_vqa_accuracy_equals_lavis_vqaeval():
    from lavis_plugins.common.vqa_eval import accuracy_by, mean_percent, vqa_accuracy

    rng = torch.Generator().manual_seed(0)
    pool = NORMALISATION_CASES
    questions = {}
    for q in range(60):
        # 10 human answers drawn from a few candidates, so agreement varies from 1 to 10
        cands = [pool[int(i)] for i in torch.randint(len(pool), (3,), generator=rng)]
        answers = [cands[int(i)] for i in torch.randint(3, (10,), generator=rng)]
        pred = pool[int(torch.randint(len(pool), (1,), generator=rng))] if q % 3 else answers[0]
        questions[q] = (pred, answers, ["yes/no", "number", "other"][q % 3])
    ref = _lavis_vqa_accuracy(questions)
    ours = {q: vqa_accuracy(pred, ans) for q, (pred, ans, _) in questions.items()}
    for q in questions:
        assert round(100 * ours[q], 2) == ref.evalQA[q], (q, questions[q])
    assert mean_percent(ours.values()) == ref.accuracy["overall"]
    assert accuracy_by(list(ours.values()), [t for _, _, t in questions.values()]) == \
        ref.accuracy["perAnswerType"]
    assert 0 < ref.accuracy["overall"] < 100  # the cases cover partial credit


def test_vqa_accuracy_partial_credit_and_exact_match():
    from lavis_plugins.common.vqa_eval import exact_match, vqa_accuracy

    # "Two." normalises to "2"; 2 of 10 humans said "2": leaving out one of them leaves 1 match
    # (1/3), leaving out one of the other 8 leaves 2 (2/3) -> (2*1/3 + 8*2/3) / 10
    assert vqa_accuracy("Two.", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
    # human answers are not digit-normalised (VQAv2's files already are), as in LAVIS
    assert vqa_accuracy("2", ["two"] * 10) == 0.0
    assert vqa_accuracy("2", ["2"] * 10) == 1.0
    assert exact_match("The Two.", "2") == 1.0 and exact_match("two dogs", "2") == 0.0


# ------------------------------------------------------------------ captioning metrics
CAPTION_REFS = {
    1: ["a man riding a horse on a beach", "a person rides a horse by the sea",
        "a man on a brown horse at the beach"],
    2: ["two dogs playing in the snow", "dogs run through snow", "two puppies play in snow."],
    3: ["a red car parked on a street", "a car is parked near the curb", "red car on the road"],
}
CAPTION_PREDS = {1: "a man riding a horse on the beach", 2: "two dogs play in the snow",
                 3: "a blue bus on a street"}


def _coco_reference_scores(tmp_path):
    """Bleu/CIDEr the COCO caption-evaluation way (COCO objects, PTB tokenizer)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from pycocotools.coco import COCO

    ann = {"images": [{"id": i} for i in CAPTION_REFS],
           "annotations": [{"image_id": i, "id": 10 * i + j, "caption": c}
                           for i, cs in CAPTION_REFS.items() for j, c in enumerate(cs)]}
    (tmp_path / "gt.json").write_text(json.dumps(ann))
    coco = COCO(str(tmp_path / "gt.json"))
    res = coco.loadRes([{"image_id": i, "caption": c} for i, c in CAPTION_PREDS.items()])
    ids = coco.getImgIds()
    tok = PTBTokenizer()
    gts = tok.tokenize({i: coco.imgToAnns[i] for i in ids})
    rs = tok.tokenize({i: res.imgToAnns[i] for i in ids})
    bleu, _ = Bleu(4).compute_score(gts, rs, verbose=0)
    cider, _ = Cider().compute_score(gts, rs)
    return bleu[3], cider


def test_caption_metrics_equal_coco_evaluation(tmp_path):
    from lavis_plugins.tasks.captioning import caption_metrics

    corpus, per_image = caption_metrics(CAPTION_PREDS, CAPTION_REFS)
    bleu4, cider = _coco_reference_scores(tmp_path)
    assert corpus["tokenizer"] == "ptb"  # java is installed here
    assert corpus["Bleu_4"] == pytest.approx(bleu4, abs=1e-12)
    assert corpus["CIDEr"] == pytest.approx(cider, abs=1e-12)
    assert per_image[1]["cider"] > per_image[3]["cider"]  # close caption beats a wrong one


def test_caption_simple_tokenizer_fallback(monkeypatch):
    """Without java the fallback tokenizer gives the same tokens on plain captions."""
    from lavis_plugins.tasks import captioning

    with_java, _ = captioning.caption_metrics(CAPTION_PREDS, CAPTION_REFS)
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    without, _ = captioning.caption_metrics(CAPTION_PREDS, CAPTION_REFS)
    assert without["tokenizer"] == "simple"
    assert without["CIDEr"] == pytest.approx(with_java["CIDEr"], rel=1e-9)
    assert captioning.simple_tokenize("Two puppies, play in snow.") == "two puppies play in snow"


# ------------------------------------------------------------------ tasks end to end
class _Dataset:
    """What the tasks read of a LAVIS evaluation dataset: its annotation list."""

    def __init__(self, annotation):
        self.annotation = annotation


@pytest.fixture
def paths(tmp_path, monkeypatch):
    from lavis.common.registry import registry

    monkeypatch.setitem(registry.mapping["paths"], "result_dir", str(tmp_path))
    monkeypatch.setitem(registry.mapping["paths"], "output_dir", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def opt_model(lp, tiny_bert_dir, tmp_path_factory):
    from lavis_plugins.api import load_model
    from lavis_plugins.common.tiny_llm import make_tiny_opt

    folder = make_tiny_opt(tmp_path_factory.mktemp("llm") / "opt")
    torch.manual_seed(0)
    return load_model("lp_blip2_opt", "tiny", bert_path=str(tiny_bert_dir),
                      opt_model=str(folder)).eval()


@pytest.fixture(scope="module")
def t5_model(lp, tiny_bert_dir, tmp_path_factory):
    from lavis_plugins.api import load_model
    from lavis_plugins.common.tiny_llm import make_tiny_t5

    folder = make_tiny_t5(tmp_path_factory.mktemp("llm") / "t5")
    torch.manual_seed(0)
    return load_model("lp_blip2_t5", "tiny", bert_path=str(tiny_bert_dir),
                      t5_model=str(folder)).eval()


def _images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_caption_task_writes_per_image_results(opt_model, paths):
    from lavis_plugins.tasks.captioning import CaptionTaskConfig, LPCaptionTask

    task = LPCaptionTask(CaptionTaskConfig(num_beams=2, max_len=5, min_len=1))
    anns = [{"image": f"{i}.jpg", "caption": CAPTION_REFS[i], "instance_id": str(k)}
            for k, i in enumerate(CAPTION_REFS)]
    task._refs_by_instance["val"] = task.references_from_dataset(_Dataset(anns))
    batch = {"image": _images(3), "image_id": torch.tensor([1, 2, 3]),
             "instance_id": ["0", "1", "2"]}
    results = task.valid_step(opt_model, batch)
    # a padded last batch repeats a sample: it must count once
    metrics = task.after_evaluation(results + results[:1], split_name="val", epoch=0)
    assert {"CIDEr", "Bleu_4", "agg_metrics"} <= set(metrics)
    assert metrics["num_images"] == 3 and metrics["num_missing"] == 0
    saved = json.loads((paths / "val_epoch0_captions.json").read_text())
    assert [r["image_id"] for r in saved] == [1, 2, 3]
    assert all({"caption", "references", "cider", "bleu_4"} <= set(r) for r in saved)
    assert "CIDEr" in (paths / "evaluate.txt").read_text()


def test_caption_task_without_references_says_how_to_fix(paths):
    from lavis_plugins.tasks.captioning import LPCaptionTask

    with pytest.raises(UserError, match="caption_gt_files"):
        LPCaptionTask().after_evaluation([{"image_id": 1, "caption": "x", "instance_id": "0"}],
                                         split_name="test", epoch=0)


def test_vqa_task_scores_and_writes_per_question_results(opt_model, paths):
    from lavis_plugins.tasks.vqa import LPVQATask, VQATaskConfig

    task = LPVQATask(VQATaskConfig(num_beams=2, max_len=4))
    anns = [{"question_id": 7, "answer": ["yes"] * 6 + ["no"] * 4},
            {"question_id": 8, "answer": "two"}]  # a VQAv2-style and a GQA-style question
    task._refs["val"] = task.references_from_dataset(_Dataset(anns))
    batch = {"image": _images(2), "text_input": ["is it red?", "how many?"],
             "question_id": torch.tensor([7, 8])}
    results = task.valid_step(opt_model, batch)
    assert [r["question_id"] for r in results] == [7, 8]
    # scoring is independent of the model: fixed predictions, one duplicated
    fixed = [{"question_id": 7, "answer": "Yes."}, {"question_id": 8, "answer": "2"},
             {"question_id": 7, "answer": "Yes."}]
    metrics = task.after_evaluation(fixed, split_name="val")
    assert metrics["agg_metrics"] == pytest.approx(100.0)
    assert metrics["metric"] == "exact_match+vqa_acc" and metrics["num_scored"] == 2
    detail = json.loads((paths / "val_vqa_scored.json").read_text())
    assert [(d["question_id"], d["prediction"], d["correct"]) for d in detail] == \
        [(7, "Yes.", 1.0), (8, "2", 1.0)]
    assert detail[0]["answers"] == anns[0]["answer"]
    official = json.loads((paths / "val_vqa_result.json").read_text())
    assert official == [{"question_id": 7, "answer": "Yes."}, {"question_id": 8, "answer": "2"}]


def test_vqa_training_targets_from_lavis_vqa_batch(opt_model):
    from lavis_plugins.tasks.vqa import LPVQATask

    task = LPVQATask()
    batch = {"image": _images(2), "text_input": ["is it red?", "how many dogs?"],
             "answer": ["no", "yes", "two", "2"], "weight": torch.tensor([0.3, 0.7, 0.5, 0.5]),
             "n_answers": torch.tensor([2, 2])}
    prompt = task.prompt_for(opt_model)
    out = task.to_generation_targets(batch, prompt)
    assert prompt == "Question: {} Answer:"
    assert out["text_output"] == ["yes", "two"]  # most agreed; first on a tie
    assert out["text_input"] == ["Question: is it red? Answer:", "Question: how many dogs? Answer:"]
    loss = task.train_step(opt_model, batch)
    assert torch.isfinite(loss)
    with pytest.raises(UserError, match="text_output"):
        task.to_generation_targets({"image": batch["image"], "text_input": ["q"]})


def test_opt_pair_training_masks_the_question(opt_model):
    out = opt_model({"image": _images(2), "text_input": ["Question: what? Answer:", "Q: x"],
                     "text_output": ["red", "two dogs"]}, return_logits=True)
    tok = opt_model.opt_tokenizer
    for row, answer in zip(out.targets, ["red", "two dogs"]):
        kept = row[row != -100].tolist()
        assert tok.decode(kept) == " " + answer + "\n"


# ------------------------------------------------------------------ batched answers, ranking
@pytest.mark.parametrize("which", ["opt_model", "t5_model"])
def test_predict_answers_batch_equals_one_by_one(which, request):
    model = request.getfixturevalue(which)
    image = _images(3, seed=4)
    questions = ["what color is the car?", "how many dogs are there in the picture?", "is it?"]
    batched = model.predict_answers({"image": image, "text_input": questions}, num_beams=3,
                                    max_len=5)
    single = [model.predict_answers({"image": image[i:i + 1], "text_input": [questions[i]]},
                                    num_beams=3, max_len=5)[0] for i in range(3)]
    assert len(batched) == 3 and batched == single


@pytest.mark.parametrize("which", ["opt_model", "t5_model"])
def test_rank_answers_picks_the_highest_likelihood(which, request):
    model = request.getfixturevalue(which)
    samples = {"image": _images(2, seed=5), "text_input": ["what color?", "how many?"]}
    answers = ["red", "two", "yes", "no", "blue car"]
    scores = model.score_candidates(samples, answers)  # (B, C) summed log-probs
    assert scores.shape == (2, 5) and (scores < 0).all()
    ranked = model.predict_answers(samples, inference_method="rank", answer_list=answers,
                                   num_ans_candidates=len(answers))
    assert ranked == [answers[i] for i in scores.argmax(1).tolist()]
    # the same score as the training loss gives a sequence: log-likelihood = -sum of token CE
    one = {"image": samples["image"][:1], "text_input": [model.format_questions(
        samples["text_input"][:1], model.default_predict_prompt())[0]], "text_output": [answers[0]]}
    with torch.no_grad():
        out = model(one, return_logits=True)
    valid = out.targets != -100
    nll = torch.nn.functional.cross_entropy(out.logits[valid], out.targets[valid], reduction="sum")
    assert scores[0, 0].item() == pytest.approx(-nll.item(), abs=1e-4)


def test_t5_caption_split_is_seeded_and_covers_the_caption(t5_model):
    caption = "a man riding a brown horse on the beach"
    torch.manual_seed(1)
    first = [t5_model.split_caption(caption) for _ in range(20)]
    torch.manual_seed(1)
    again = [t5_model.split_caption(caption) for _ in range(20)]
    assert first == again
    assert all((p + " " + s).strip() == caption and s for p, s in first)
    assert len({p for p, _ in first}) > 3  # the split point varies
    loss = t5_model({"image": _images(2), "text_input": [caption, "two dogs"]}).loss
    assert torch.isfinite(loss)


# ------------------------------------------------------------------ bad input
def test_prompt_longer_than_context_is_a_user_error(opt_model, t5_model):
    image = _images(1)
    with pytest.raises(UserError, match=r"exceed OPT's context of 128"):
        opt_model.generate({"image": image, "prompt": "dog " * 150}, max_length=5)
    with pytest.raises(UserError, match="exceed the T5 encoder's 512"):
        t5_model.predict_answers({"image": image, "text_input": ["dog " * 600]})


def test_t5_pair_mode_without_text_output_names_the_field(t5_model):
    t5_model.cfg.prefix_lm_mode = "pair"
    try:
        with pytest.raises(UserError, match=r"text_output.*prefix_lm_mode: auto / split"):
            t5_model({"image": _images(1), "text_input": ["a dog"]})
    finally:
        t5_model.cfg.prefix_lm_mode = "auto"


def test_generation_argument_errors(opt_model):
    image = _images(2)
    with pytest.raises(UserError, match="num_captions"):
        opt_model.generate({"image": image}, num_beams=2, num_captions=3)
    with pytest.raises(UserError, match="2 images"):
        opt_model.generate({"image": image, "prompt": ["a", "b", "c"]})
    with pytest.raises(UserError, match="no '{}'"):
        opt_model.predict_answers({"image": image, "text_input": ["q1", "q2"]},
                                  prompt="Question: Answer:")
    with pytest.raises(UserError, match="non-empty answer list"):
        opt_model.predict_answers({"image": image, "text_input": ["q1", "q2"]},
                                  inference_method="rank", answer_list=None)


def test_gather_unique_keeps_first_of_each_id():
    from lavis_plugins.tasks.captioning import gather_unique

    rows = [{"instance_id": "1", "v": 1}, {"instance_id": None, "image_id": 5, "v": 2},
            {"instance_id": "1", "v": 3}, {"instance_id": None, "image_id": 5, "v": 4}]
    assert [r["v"] for r in gather_unique(rows, "instance_id", "image_id")] == [1, 2]


# ------------------------------------------------------------------ training, configs
@pytest.mark.parametrize("which", ["opt_model", "t5_model"])
def test_a_few_steps_lower_the_loss(which, request):
    """Q-Former + projection learn (the LLM is frozen): 15 AdamW steps on one batch."""
    model = request.getfixturevalue(which)
    model = copy.deepcopy(model).train()
    samples = {"image": _images(4, seed=7),
               "text_input": ["a red circle", "two blue squares", "a small triangle", "a cat"]}
    if which == "t5_model":  # fixed pairs, so the loss is comparable between steps
        samples["text_output"] = ["on the left", "on the right", "in the middle", "near a dog"]
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and not any(p.requires_grad for p in model.llm.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(dict(samples)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def _stage2_yamls():
    from pathlib import Path

    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1]
    # the stage-1 model's YAMLs (pre-training, retrieval, zero-shot classification) are not
    return sorted(p for p in [*root.glob("projects/blip2/*/*.yaml"),
                              *root.glob("configs/models/lp_blip2_opt_*.yaml"),
                              *root.glob("configs/models/lp_blip2_t5_*.yaml")]
                  if OmegaConf.load(p).model.arch != "lp_blip2_qformer")


@pytest.mark.parametrize("path", _stage2_yamls(), ids=lambda p: p.name)
def test_stage2_yaml_settings_are_accepted(lp, path):
    """Every stage-2 YAML's model keys are settings the model knows (merged with its default
    YAML as LAVIS's Config does), and its run keys set up the task."""
    import argparse

    from lavis.common.config import Config
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    if path.parts[-3] == "configs":
        model_cfg, run_cfg = OmegaConf.load(path).model, None
    else:
        cfg = Config(argparse.Namespace(cfg_path=str(path), options=[]))
        model_cfg, run_cfg = cfg.model_cfg, cfg
        assert path.read_text().startswith("# torchrun --nproc_per_node=8 -m lavis_plugins.cli ")
    cls = registry.get_model_class(model_cfg.arch)
    settings = cls.CONFIG_CLASS.from_cfg(model_cfg, model_cfg.arch)
    assert settings.vit_model in ("eva_clip_g", "tiny")
    if run_cfg is not None and run_cfg.run_cfg.task.startswith("lp_") and \
            run_cfg.run_cfg.task != "lp_image_text_pretrain":
        task = registry.get_task_class(run_cfg.run_cfg.task).setup_task(cfg=run_cfg)
        assert task.cfg.num_beams >= 1


_DIST_SCRIPT = '''
import json, os, sys
import torch
import lavis_plugins
from lavis.common.registry import registry
from lavis_plugins.common import dist
from lavis_plugins.tasks.vqa import LPVQATask, _Reference

dist.init_distributed("cpu")
rank = dist.get_rank()
out = sys.argv[1]
registry.mapping["paths"]["result_dir"] = out
registry.mapping["paths"]["output_dir"] = out
task = LPVQATask()
task._refs["val"] = {str(q): _Reference(["yes"] * 10) for q in range(10)}
# rank 0 answers 0-5, rank 1 answers 5-9: question 5 twice (a padded shard), none lost
mine = range(0, 6) if rank == 0 else range(5, 10)
metrics = task.after_evaluation([{"question_id": q, "answer": "yes" if q % 2 else "no"}
                                 for q in mine], split_name="val")
if rank == 0:
    json.dump(metrics, open(os.path.join(out, "metrics.json"), "w"))
'''


@pytest.mark.slow
def test_results_merge_across_two_processes(tmp_path):
    """Under torchrun (gloo, 2 ranks) every question is scored once."""
    import subprocess
    import sys

    script = tmp_path / "merge.py"
    script.write_text(_DIST_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           str(script), str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_scored"] == 10 and metrics["num_missing"] == 0
    assert metrics["agg_metrics"] == pytest.approx(50.0)
    scored = json.loads((tmp_path / "val_vqa_scored.json").read_text())
    assert sorted(r["question_id"] for r in scored) == list(range(10))


@pytest.mark.parametrize("arch,key", [("lp_blip2_opt", "opt_model"), ("lp_blip2_t5", "t5_model")])
def test_load_model_and_preprocess_gives_a_working_model(lp, tiny_bert_dir, tmp_path, arch, key):
    from PIL import Image

    from lavis_plugins.api import load_model_and_preprocess
    from lavis_plugins.common.tiny_llm import make_tiny_opt, make_tiny_t5

    folder = (make_tiny_opt if key == "opt_model" else make_tiny_t5)(tmp_path / key)
    model, vis, txt = load_model_and_preprocess(arch, "tiny", is_eval=True,
                                                bert_path=str(tiny_bert_dir), **{key: str(folder)})
    image = vis["eval"](Image.new("RGB", (48, 40), (200, 30, 30)))[None]  # (1, 3, 32, 32)
    caption = model.generate({"image": image}, num_beams=2, max_length=4)
    answer = model.predict_answers({"image": image, "text_input": [txt["eval"]("What colour?")]},
                                   num_beams=2, max_len=3)
    assert len(caption) == 1 and len(answer) == 1 and isinstance(answer[0], str)
