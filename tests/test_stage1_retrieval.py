"""lp_retrieval: ITC top-k re-ranked by ITM gives LAVIS's compute_sim_matrix scores, the same
in one process and in two (each with half the images), and LAVIS's recall metrics."""
from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

CAPTIONS = ["a red circle", "a big red circle", "a blue square", "a small blue square",
            "two green triangles", "green triangles on the left", "a yellow cat",
            "a cat sitting", "the white sky", "a sky above a tree"]


class TinyRetrievalSet(Dataset):
    """LAVIS's retrieval eval dataset interface: 5 images, 2 captions each."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.image = list(torch.randn(5, 3, 32, 32, generator=g))
        self.text = CAPTIONS
        self.img2txt = {i: [2 * i, 2 * i + 1] for i in range(5)}
        self.txt2img = {t: t // 2 for t in range(10)}

    def __len__(self):
        return len(self.image)

    def __getitem__(self, i):
        return {"image": self.image[i], "index": i}


@pytest.fixture(scope="module")
def model(lp, tiny_bert_dir):
    torch.manual_seed(0)
    m = lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir), is_eval=True)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name != "temp":
                p.add_(torch.randn_like(p) * 0.2)
    return m


def loader(indices=None):
    ds = TinyRetrievalSet()
    sub = torch.utils.data.Subset(ds, indices) if indices is not None else ds
    dl = DataLoader(sub, batch_size=2)
    dl.dataset.text, dl.dataset.image = ds.text, ds.image  # Subset hides them
    dl.dataset.txt2img, dl.dataset.img2txt = ds.txt2img, ds.img2txt
    return dl


@pytest.mark.parametrize("k_test", [3, 128])
def test_scores_equal_lavis_compute_sim_matrix(model, k_test):
    from lavis.models.blip2_models.blip2 import compute_sim_matrix

    from lavis_plugins.tasks.retrieval import compute_retrieval_scores

    i2t, t2i = compute_retrieval_scores(model, loader(), k_test)
    # LAVIS's own procedure run on our model (it has LAVIS's forward_image / compute_itm API);
    # LAVIS cannot take k beyond the number of images (5)
    with torch.no_grad():  # LAVIS's runner calls it so
        ref_i2t, ref_t2i = compute_sim_matrix(model, loader(), k_test=min(k_test, 5))
    np.testing.assert_allclose(t2i, ref_t2i, atol=1e-5)
    if k_test == 3:
        np.testing.assert_allclose(i2t, ref_i2t, atol=1e-5)
        assert ((i2t == -100).sum(1) == 10 - 3).all() and ((t2i == -100).sum(1) == 5 - 3).all()
    else:  # ours re-ranks every pair; LAVIS (k=5) the 5 best texts of each image
        assert (i2t > -100).all() and (t2i > -100).all()
        top = ref_i2t > -100
        np.testing.assert_allclose(i2t[top], ref_i2t[top], atol=1e-5)


def test_task_reports_lavis_recall_metrics(model, tmp_path, monkeypatch):
    from lavis.common.registry import registry

    from lavis_plugins.tasks.retrieval import LPRetrievalTask, compute_retrieval_scores

    monkeypatch.setitem(registry.mapping["paths"], "output_dir", str(tmp_path))
    task = LPRetrievalTask(cfg={"k_test": 4})
    metrics = task.evaluation(model, loader())
    details = {}
    i2t, t2i = compute_retrieval_scores(model, loader(), 4, details)
    ds = TinyRetrievalSet()
    lavis = LPRetrievalTask._report_metrics(i2t, t2i, ds.txt2img, ds.img2txt)
    assert {k: metrics[k] for k in lavis} == lavis
    # what the ITM re-ranking is compared with: R@1 of the ITC matrix alone (LAVIS's metrics
    # on it), and the ITM head's balanced accuracy on the re-ranked pairs
    itc = LPRetrievalTask._report_metrics(details["itc"], details["itc"].T, ds.txt2img,
                                          ds.img2txt)
    assert metrics["itc_txt_r1"] == itc["txt_r1"] and metrics["itc_img_r1"] == itc["img_r1"]
    match = details["itm_match"]
    assert set(np.unique(match)) <= {-1.0, 0.0, 1.0} and (match >= 0).sum() > 0
    truth = np.zeros_like(match, dtype=bool)
    for i in range(len(ds.image)):
        truth[i, list(ds.img2txt[i])] = True
    pos, neg = (match >= 0) & truth, (match >= 0) & ~truth
    want = 50 * ((match[pos] == 1).mean() + (match[neg] == 0).mean())
    assert metrics["itm_acc"] == pytest.approx(want)
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"):
        assert 0 <= metrics[key] <= 100
    assert metrics["txt_r10"] == 100 and metrics["img_r10"] == 100  # 10 texts, 5 images


def _worker(rank: int, init_file: str, model, out_dir: str) -> None:
    import torch.distributed as dist

    from lavis_plugins.tasks.retrieval import compute_retrieval_scores

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # as lp_runner shards evaluation: rank::world, unpadded (rank 0: 3 images, rank 1: 2)
        i2t, t2i = compute_retrieval_scores(model, loader(list(range(rank, 5, 2))), 3)
        np.save(os.path.join(out_dir, f"i2t_{rank}.npy"), i2t)
        np.save(os.path.join(out_dir, f"t2i_{rank}.npy"), t2i)
    finally:
        # no destroy_process_group(): with one rank gone it can block the other for good
        # (seen here after earlier tests); a forked worker exits with os._exit, which frees it
        pass


def test_two_processes_with_image_shards_give_the_same_scores(model, tmp_path):
    from lavis_plugins.tasks.retrieval import compute_retrieval_scores

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(r, str(tmp_path / "init"), model, str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        if p.is_alive():
            p.terminate()
            pytest.fail("distributed worker did not finish in 300 s")
        assert p.exitcode == 0
    i2t, t2i = compute_retrieval_scores(model, loader(), 3)
    for r in range(2):  # every process ends with the whole matrices
        np.testing.assert_allclose(np.load(tmp_path / f"i2t_{r}.npy"), i2t, atol=1e-5)
        np.testing.assert_allclose(np.load(tmp_path / f"t2i_{r}.npy"), t2i, atol=1e-5)
