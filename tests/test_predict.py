"""``lavis-plugins predict``: one-shot captioning, VQA and caption matching for an image, a video
or a folder, as JSON lines, through the model's evaluation processors; bad input is one line."""
from __future__ import annotations

import json

import pytest
from PIL import Image


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for i, colour in enumerate([(220, 20, 20), (20, 20, 220), (20, 200, 20)]):
        Image.new("RGB", (48, 40), colour).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _run(argv, capsys):
    from lavis_plugins.cli import main

    rc = main(["predict", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_caption_a_folder_as_jsonl_with_progress(lp, photos, tmp_path, capsys):
    out_file = tmp_path / "caps.jsonl"
    rc, _, err = _run(["--model", "lp_blip2_opt", "--model-type", "tiny", "--folder", str(photos),
                       "--num-beams", "2", "--max-len", "4", "--batch-size", "2",
                       "--output", str(out_file)], capsys)
    assert rc == 0, err
    rows = [json.loads(ln) for ln in out_file.read_text().splitlines()]
    assert [r["file"] for r in rows] == [str(photos / f"img{i}.png") for i in range(3)]
    assert all(r["task"] == "caption" and isinstance(r["caption"], str) for r in rows)
    assert "predict caption: 3/3 file (100%)" in err and "\r" not in err


def test_caption_equals_the_model_on_the_eval_processor(lp, photos, capsys):
    """The same processor as evaluation: the CLI's caption is the model's on blip_image_eval."""
    import torch

    torch.manual_seed(0)  # the tiny model's untrained parts are drawn from the global RNG
    rc, out, err = _run(["--model", "lp_blip2_opt", "--model-type", "tiny", "--image",
                         str(photos / "img0.png"), "--num-beams", "1", "--max-len", "5"], capsys)
    assert rc == 0, err
    (row,) = [json.loads(ln) for ln in out.splitlines()]
    torch.manual_seed(0)
    model, vis, _ = lp.load_model_and_preprocess("lp_blip2_opt", "tiny", is_eval=True)
    image = vis["eval"](Image.open(photos / "img0.png").convert("RGB")).unsqueeze(0)
    assert row["caption"] == model.generate({"image": image}, num_beams=1, max_length=5)[0]


def test_vqa_on_an_image_and_a_video(lp, photos, tmp_path, capsys):
    from lavis_plugins.video.synthetic import write_video

    rc, out, err = _run(["--model", "lp_blip2_t5", "--model-type", "tiny", "--image",
                         str(photos / "img1.png"), "--question", "What colour?", "--max-len", "3",
                         "--num-beams", "1"], capsys)
    assert rc == 0, err
    row = json.loads(out)
    assert (row["task"] == "vqa" and row["question"] == "What colour?"
            and isinstance(row["answer"], str))
    video = write_video(tmp_path / "clip.mp4", num_frames=10)
    rc, out, err = _run(["--model", "lp_blip2_video_opt", "--model-type", "tiny", "--video",
                         str(video), "--question", "what moves?", "--max-len", "3",
                         "--num-beams", "1"], capsys)
    assert rc == 0, err
    assert json.loads(out)["file"] == str(video)


def test_retrieve_ranks_the_texts_by_itm(lp, photos, capsys):
    texts = ["a red square", "a blue circle", "a green triangle"]
    rc, out, err = _run(["--model", "lp_blip2_qformer", "--model-type", "tiny", "--image",
                         str(photos / "img0.png"), "--task", "retrieve", "--texts", *texts,
                         "--top-k", "2"], capsys)
    assert rc == 0, err
    matches = json.loads(out)["matches"]
    assert len(matches) == 2 and {m["text"] for m in matches} <= set(texts)
    assert matches[0]["itm"] >= matches[1]["itm"] and all(-1 <= m["itc"] <= 1 for m in matches)


@pytest.mark.parametrize("argv, message", [
    (["--image", "/nonexistent.jpg"], "not a file: /nonexistent.jpg"),
    (["--folder", "/nonexistent"], "is not a folder"),
    (["--image", "{img}", "--task", "vqa"], "--task vqa needs --question"),
    (["--image", "{img}", "--task", "retrieve"], "--task retrieve needs --texts"),
    (["--image", "{img}", "--question", "q", "--task", "caption"], "--question is for --task vqa"),
    (["--video", "{img}"], "takes images; for videos use a video model"),
    (["--image", "{img}", "--top-k", "0"], "--top-k must be at least 1"),
    (["--image", "{img}", "--options", "vit_path"], "--options takes key=value"),
    (["--image", "{img}", "--options", "no_such_key=1"], "unknown key"),
])
def test_bad_input_is_one_line_and_exit_2(lp, photos, capsys, argv, message):
    argv = [a.replace("{img}", str(photos / "img0.png")) for a in argv]
    rc, _, err = _run(["--model", "lp_blip2_opt", "--model-type", "tiny", *argv], capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_model_without_the_task_is_refused(lp, photos, capsys):
    rc, _, err = _run(["--model", "lp_blip2_qformer", "--model-type", "tiny", "--image",
                       str(photos / "img0.png"), "--question", "what?"], capsys)
    assert rc == 2 and "cannot --task vqa" in err
    rc, _, err = _run(["--model", "lp_blip2_opt", "--model-type", "tiny", "--folder",
                       str(photos / ".."), "--max-len", "2"], capsys)
    assert rc == 2 and "holds no image files" in err
