"""Exports other tools load: SAELens-native and sparsify folders, scales folded in, checked by
loading every folder in the peer library and comparing its reconstruction of raw activations."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model_dir
from safetensors.torch import load_file

from lgsae import GroupSAE
from lgsae.export import export, fold

LAYERS, SCALES = [0, 1, 2], [0.05, 1.7, 23.0]  # three different layer scales


def make_run(tmp_path, arch: str):
    """A run folder as lgsae.train leaves it: run.json, a 3-layer group SAE with firing counts
    and a one-layer SAE, on a saved tiny model."""
    model = tiny_model_dir(tmp_path / "model", arch=arch)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"model": model, "dataset": None, "ctx": 32,
                                              "trust_remote_code": False}))
    g = torch.Generator().manual_seed(5)
    group = GroupSAE(32, k=4, num_latents=48, layers=LAYERS, scales=SCALES, model=model, seed=1)
    with torch.no_grad():  # a trained-looking SAE: non-zero biases
        group.b_dec.normal_(generator=g)
        group.encoder.bias.normal_(generator=g).mul_(0.1)
    counts = torch.randint(0, 50, (3, 48), generator=g)
    counts[1, 7] = 0  # a latent that never fired at layer 1
    group.save(run / "saes" / "groups" / "L00-L02",
               firing={"counts": counts, "tokens": torch.tensor([500, 500, 500])})
    single = GroupSAE(32, k=4, num_latents=40, layers=[3], scales=[0.3], model=model, seed=2)
    single.save(run / "saes" / "per-layer" / "L03")
    (run / "metrics.json").write_text(json.dumps({"methods": {
        "groups": {"saes": {"groups/L00-L02": {}}},
        "per-layer": {"saes": {"per-layer/L03": {}}}}}))
    return run, group, single, counts


def raw(layer: int, n: int = 64) -> torch.Tensor:
    """Activations at the raw scale of `layer` (its scale brings them to unit mean norm)."""
    x = torch.randn(n, 32, generator=torch.Generator().manual_seed(layer))
    scale = dict(zip(LAYERS + [3], SCALES + [0.3]))[layer]
    return x / x.norm(dim=1, keepdim=True).mean() / scale


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_fold_is_exact_against_groupsae_forward():
    sae = GroupSAE(32, k=4, num_latents=48, layers=LAYERS, scales=SCALES, seed=1).double()
    with torch.no_grad():
        sae.b_dec.normal_()
    for v in LAYERS:
        w = {k: t.double() for k, t in fold(sae, v).items()}
        x = raw(v).double()
        pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
        acts, idx = pre.topk(4, dim=1)
        recon = (torch.zeros_like(pre).scatter_(1, idx, acts)) @ w["W_dec"] + w["b_dec"]
        assert rel_err(recon, sae(x, layer=v).recon) < 1e-6, v


@pytest.mark.parametrize("arch,full,base", [("llama", "model.layers", "layers"),
                                            ("gpt2", "transformer.h", "h")])
def test_saelens_loads_every_exported_folder_and_reconstructs_raw_activations(
        tmp_path, arch, full, base):
    from sae_lens import SAE

    run, group, single, counts = make_run(tmp_path, arch)
    folders = export(run, "saelens", tmp_path / "out")
    names = sorted(str(p.relative_to(tmp_path / "out")) for p in folders)
    assert names == [f"groups/{full}.{v}" for v in LAYERS] + [f"per-layer/{full}.3"]
    for folder in folders:
        peer = SAE.load_from_disk(str(folder))
        cfg = json.loads((folder / "cfg.json").read_text())
        v = int(folder.name.rsplit(".", 1)[1])
        ours = group if v in LAYERS else single
        x = raw(v)
        assert rel_err(peer.decode(peer.encode(x)), ours(x, layer=v).recon) <= 1e-5, folder
        assert cfg["metadata"]["hook_name"] == f"{full}.{v}" and cfg["d_sae"] == ours.num_latents
        if v in LAYERS:  # training firing rate of that layer, log10
            sparsity = load_file(folder / "sparsity.safetensors")["sparsity"]
            rate = counts[LAYERS.index(v)].double() / 500
            assert torch.allclose(sparsity.double(), torch.log10(rate + 1e-10), atol=1e-5)
            assert float(sparsity[7]) == pytest.approx(-10, abs=1e-4) or v != 1
        else:
            assert not (folder / "sparsity.safetensors").exists()  # no counts were recorded


@pytest.mark.parametrize("arch,base", [("llama", "layers"), ("gpt2", "h")])
def test_sparsify_loads_every_exported_folder_and_reconstructs_raw_activations(
        tmp_path, arch, base, monkeypatch):
    monkeypatch.setenv("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder fails on CPU tensors
    import sparsify.sparse_coder
    from sparsify import SparseCoder
    from sparsify.utils import eager_decode

    if not torch.cuda.is_available():  # in case sparsify was imported before the variable
        monkeypatch.setattr(sparsify.sparse_coder, "decoder_impl", eager_decode)

    run, group, single, _ = make_run(tmp_path, arch)
    folders = export(run, "sparsify", tmp_path / "out")
    assert sorted(p.name for p in folders if p.parent.name == "groups") == \
        [f"{base}.{v}" for v in LAYERS]
    config = json.loads((tmp_path / "out" / "groups" / "config.json").read_text())
    assert config["hookpoints"] == [f"{base}.{v}" for v in LAYERS]
    for folder in folders:
        peer = SparseCoder.load_from_disk(folder)
        v = int(folder.name.rsplit(".", 1)[1])
        ours = group if v in LAYERS else single
        x = raw(v)
        assert rel_err(peer(x).sae_out, ours(x, layer=v).recon) <= 1e-5, folder


def test_saelens_sparsify_loader_is_the_path_that_does_not_work(tmp_path):
    """SAELens's own sparsify converter transposes W_dec ([M, D] already), so it cannot load a
    sparsify folder with M != D; the README points SAELens users at --format saelens."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import sparsify_disk_loader

    run, *_ = make_run(tmp_path, "llama")
    folders = export(run, "sparsify", tmp_path / "out")
    with pytest.raises(Exception, match="size mismatch|shape"):
        SAE.load_from_disk(str(folders[0]), converter=sparsify_disk_loader)


def test_cfg_json_tells_the_truth_and_old_folders_still_load(tmp_path):
    sae = GroupSAE(32, k=4, num_latents=40, layers=[1])
    cfg = json.loads((sae.save(tmp_path / "a") / "cfg.json").read_text())
    assert cfg["num_latents"] == 40 and cfg["expansion_factor"] == 1.25
    assert cfg["dtype"] == "float32"
    wide = GroupSAE(32, k=4, num_latents=128, layers=[1])
    assert json.loads((wide.save(tmp_path / "b") / "cfg.json").read_text())[
        "expansion_factor"] == 4
    # a folder written before (expansion_factor 16 whatever the width) loads unchanged
    old = json.loads((tmp_path / "a" / "cfg.json").read_text())
    old["expansion_factor"] = 16
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(old))
    back = GroupSAE.load(tmp_path / "a")
    assert back.num_latents == 40 and torch.equal(back.W_dec, sae.W_dec)


def test_export_refuses_a_non_empty_out_and_a_non_run(tmp_path):
    run, *_ = make_run(tmp_path, "llama")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export(run, "saelens", tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="not a finished lgsae run"):
        export(tmp_path, "saelens", tmp_path / "x")
    with pytest.raises(ValueError, match="not in"):
        export(run, "saelens", tmp_path / "y", methods=["even"])
    with pytest.raises(ValueError, match="inside the run folder"):
        export(run, "saelens", run / "saes" / "exported")
    # a leftover of a killed save is not exported; a missing SAE is one error, nothing written
    GroupSAE(32, k=4, num_latents=8, layers=[0]).save(run / "saes" / "groups" / ".tmp-x")
    assert len(export(run, "saelens", tmp_path / "z", methods=["groups"])) == 3
    import shutil
    shutil.rmtree(run / "saes" / "per-layer" / "L03")
    with pytest.raises(FileNotFoundError, match="lacks its saved SAEs"):
        export(run, "sparsify", tmp_path / "w")
    assert not (tmp_path / "w").exists()
    out = subprocess.run([sys.executable, "-m", "lgsae.export", str(run), "--format",
                          "sparsify", "--out", str(tmp_path / "busy")],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "not empty" in out.stderr
