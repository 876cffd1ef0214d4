"""Training pipeline: end to end on a tiny model, save/load, resume after SIGKILL, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CharTokenizer, assert_close, tiny_model, tiny_model_dir, write_texts
from safetensors.torch import load_file

from lgsae import GroupSAE
from lgsae.config import TrainConfig
from lgsae.plan import SAESpec
from lgsae.sources import Forward, InMemoryActivations, context_batches
from lgsae.train import main
from lgsae.trainer import Trainer


def sample(tmp_path, tokens: int, ctx: int = 32) -> InMemoryActivations:
    """Activations of every layer of the tiny model over `tokens` tokens, in memory."""
    model = tiny_model()
    fwd = Forward(model, list(range(4)), batch_size=4, store=torch.float32, device="cpu")
    ids = context_batches(CharTokenizer(61), {"dataset": write_texts(tmp_path / "t.jsonl")},
                          ctx=ctx, start=0, count=tokens // ctx, per=8)
    return InMemoryActivations.collect(fwd, ids, ctx)


def trainer_for(acts: InMemoryActivations, spec: SAESpec, cfg: TrainConfig) -> Trainer:
    return Trainer([spec], cfg, "tiny", d_model=acts.d_model, scales=acts.scales,
                   total_tokens=acts.n_stat_tokens)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return {"model": tiny_model_dir(d / "m", n_layers=5),
            "text": write_texts(d / "t.jsonl", n_docs=300), "cache": d / "cache"}


def flags(tiny, out, *extra):
    return ["--model", tiny["model"], "--dataset", tiny["text"], "--tokens", "2048",
            "--eval-tokens", "128", "--stat-tokens", "256", "--ctx", "32", "--batch", "256",
            "--buffer-tokens", "1024", "--expansion", "2", "--k", "4", "--checkpoint-minutes",
            "0", "--out", str(out), "--no-progress",
            *(() if "--browse" in extra else ("--no-browse",)), *extra]


def test_end_to_end_writes_every_output(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("LGSAE_CACHE", str(tiny["cache"]))
    metrics = main(flags(tiny, tmp_path / "run", "--baselines", "per-layer,even,smaller,single",
                         "--browse"))
    run = tmp_path / "run"
    for f in ("run.json", "groups.json", "metrics.json", "report.md", "per_layer.png",
              "distances.png", "dendrogram.png", "amad.png"):
        assert (run / f).is_file(), f
    assert not (run / "checkpoints").exists()  # deleted after a finished run
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in ("model", "tokens_train", "tokens_eval", "chosen_G", "methods"):
        assert key in on_disk
    assert set(on_disk["methods"]) == {"groups", "per-layer", "even", "smaller", "single"}
    # --tokens is the training budget: 8 whole batches of 256
    assert on_disk["tokens_train"] == 2048 and on_disk["tokens_eval"] == 128
    assert on_disk["source"] == "stream" and on_disk["stat_tokens"] == 256
    for name, m in on_disk["methods"].items():
        for key in ("n_saes", "fvu", "delta_ce_pct", "l0", "dead_pct", "kl", "train_seconds",
                    "forward_seconds", "flops", "per_layer"):
            assert key in m, (name, key)
        assert set(m["per_layer"]) == {str(v) for v in range(5)}
        assert 0 < m["fvu"] < 1.5 and 0 < m["l0"] <= 4
    assert on_disk["methods"]["per-layer"]["n_saes"] == 5
    assert on_disk["methods"]["single"]["n_saes"] == 2  # layers 0..3 together, 4 alone
    umask = os.umask(0)
    os.umask(umask)
    for f in ("metrics.json", "report.md", "per_layer.png", "run.json"):  # not mkstemp's 0600
        assert (run / f).stat().st_mode & 0o777 == 0o666 & ~umask, f
    saes = sorted(p.parent for p in (run / "saes").rglob("cfg.json"))
    n = sum(m["n_saes"] for m in on_disk["methods"].values())
    assert len(saes) == n
    kept = on_disk["tokens_train_kept"]
    assert 0 < kept < on_disk["tokens_train"]  # the EOS positions joining documents are out
    for folder in saes:
        sae = GroupSAE.load(folder)
        assert sae.layers and sae.model_name == tiny["model"]
        assert sae.hookpoints == [f"layers.{v}" for v in sae.layers]  # LlamaModel.layers
        firing = load_file(folder / "firing.safetensors")  # training firings per member layer
        assert firing["counts"].shape == (len(sae.layers), sae.num_latents)
        assert int(firing["tokens"].sum()) == kept  # every kept token counted at its layer
        assert int(firing["counts"].sum()) <= sae.k * kept
    table = (run / "report.md").read_text()
    assert "| groups |" in table and "Pythia-160M" in table
    # the latent browser, linked from the report with its three example latents
    assert (run / "browser" / "index.html").is_file() and (run / "latents.png").is_file()
    assert "[browser/index.html](browser/index.html)" in table and "latents.png" in table
    assert len(on_disk["browser"]["examples"]) == 3
    assert "streamed from the model through a" in " ".join(table.split())


def test_saved_sae_reproduces_its_reconstruction(tmp_path):
    cache = sample(tmp_path, 512)
    spec = SAESpec("groups/L01-L02", "groups", [1, 2], 64)
    trainer = trainer_for(cache, spec, TrainConfig(k=4, batch=128))
    x1, x2 = (next(cache.iter_shards([v], skip_sink=True))[v] for v in (1, 2))
    trainer.fit(({1: x1[i:i + 128], 2: x2[i:i + 128]} for i in range(0, 384, 128)),
                progress=False)
    assert trainer.step == 3  # 512 tokens minus 16 sink positions, in batches of 128
    trainer.saes[0].save(tmp_path / "sae")
    back = GroupSAE.load(tmp_path / "sae")
    x = next(cache.iter_shards([2]))[2].float()
    assert torch.equal(back(x, layer=2).recon, trainer.saes[0](x, layer=2).recon)
    assert back.scales.tolist() == pytest.approx([cache.scales[1], cache.scales[2]])


_CHILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import lgsae.train as T
import lgsae.trainer as TR
real = TR.Trainer.train_batch
def dying(self, batch):
    if self.step == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, batch)
TR.Trainer.train_batch = dying
T.main({argv!r})
"""


def test_resume_after_sigkill_gives_identical_weights(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("LGSAE_CACHE", str(tiny["cache"]))
    argv = flags(tiny, tmp_path / "killed")
    child = _CHILD.format(tests=str(Path(__file__).parent), argv=argv)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in (tmp_path / "killed" / "checkpoints").glob("step_*")] == ["step_000005"]
    main(flags(tiny, tmp_path / "killed", "--resume"))
    main(flags(tiny, tmp_path / "clean"))
    a = sorted((tmp_path / "killed" / "saes").rglob("*.safetensors"))  # weights and firing counts
    b = sorted((tmp_path / "clean" / "saes").rglob("*.safetensors"))
    assert [p.relative_to(tmp_path / "killed") for p in a] == \
        [p.relative_to(tmp_path / "clean") for p in b] and a
    for x, y in zip(a, b):
        assert x.read_bytes() == y.read_bytes(), x


def test_existing_run_folder_is_never_overwritten_silently(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("LGSAE_CACHE", str(tiny["cache"]))
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not empty and is not an lgsae run"):
        main(flags(tiny, out))  # --resume / --overwrite would be refused: not suggested
    with pytest.raises(FileExistsError, match="is not an lgsae run folder"):
        main(flags(tiny, out, "--overwrite"))
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "run.json").write_text(json.dumps({"k": 99}))
    with pytest.raises(FileExistsError, match="pass --resume to continue it or --overwrite"):
        main(flags(tiny, out))
    with pytest.raises(ValueError, match=r"other flags \(.*--k 99[,)]"):  # names what it was
        main(flags(tiny, out, "--resume"))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        main(flags(tiny, tmp_path / "fresh", "--resume"))


def test_device_this_machine_lacks_is_one_clear_error(tmp_path):
    """--device cuda without a GPU, or a name torch does not know: one ValueError before
    anything is written (torch's own is an AssertionError from deep inside the first CUDA call)."""
    from lgsae.config import check_device

    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device name torch knows"):
        check_device("cpux")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device on this machine.*--device cpu"):
            main(["--device", "cuda", "--out", str(tmp_path / "run")])
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, exc, match", [
    (["--k", "80"], ValueError, r"k=80 must be in \[1, 64\]"),
    (["--groups", "0-2;3-9"], ValueError, r"unknown layers \[5, 6, 7, 8, 9\]"),
    (["--groups", "0-1;1-3"], ValueError, "each layer once"),
    (["--baselines", "per-layer,bogus"], ValueError, r"--baselines: unknown \['bogus'\]"),
    (["--wandb", "proj"], ValueError, r"--wandb needs the wandb package: python -m pip install"),
])
def test_bad_flags_give_one_clear_error(tiny, tmp_path, monkeypatch, extra, exc, match):
    if "--wandb" in extra:  # as if wandb were not installed (the peers extra brings it)
        monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setenv("LGSAE_CACHE", str(tiny["cache"]))
    with pytest.raises(exc, match=match):
        main(flags(tiny, tmp_path / "run", *extra))


def test_nan_in_a_batch_names_layer_and_step(tmp_path):
    cache = sample(tmp_path, 256)
    trainer = trainer_for(cache, SAESpec("per-layer/L02", "per-layer", [2], 64),
                          TrainConfig(k=4, batch=64))
    batch = {2: torch.randn(64, 32)}
    trainer.train_batch(batch)
    batch[2][7, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite activations at layer 2 in step 1"):
        trainer.train_batch(batch)


def test_width_mismatch_is_one_clear_error(tmp_path):
    from lgsae.evaluate import reconstruction_metrics

    cache = sample(tmp_path, 64)
    with pytest.raises(ValueError, match="input width 32 does not match the SAE's d_in=16"):
        reconstruction_metrics({"x": {1: GroupSAE(16, k=2, num_latents=8, layers=[1])}}, cache)


def test_bf16_training_keeps_fp32_master_weights(tmp_path):
    cache = sample(tmp_path, 512)
    spec = SAESpec("groups/L01-L02", "groups", [1, 2], 64)
    trainer = trainer_for(cache, spec, TrainConfig(k=4, batch=128, dtype="bfloat16"))
    before = trainer.saes[0].encoder.weight.detach().clone()
    x1, x2 = (next(cache.iter_shards([v], skip_sink=True))[v] for v in (1, 2))
    trainer.fit(({1: x1[i:i + 128], 2: x2[i:i + 128]} for i in range(0, 384, 128)),
                progress=False)
    sae = trainer.saes[0]
    assert (sae.dtype, sae.compute_dtype) == (torch.float32, torch.bfloat16)
    assert all(t.dtype == torch.float32 for st in trainer.opts[0].state.values()
               for t in st.values() if t.dim())
    # updates smaller than a bf16 ulp survive in the fp32 master weights
    delta = (sae.encoder.weight.detach() - before).abs()
    assert bool((delta[delta > 0] < before.abs()[delta > 0] / 256).any())


def test_batch_and_dtype_default_by_device():
    """Unset --batch/--dtype: 4096 tokens in bf16 on CUDA, 256 in fp32 on CPU; given, kept."""
    from lgsae.config import DataConfig, PipelineConfig

    cpu, cuda = PipelineConfig(data=DataConfig(device="cpu")), \
        PipelineConfig(data=DataConfig(device="cuda:0"))
    assert (cpu.train.batch, cpu.train.dtype) == (256, "float32")
    assert (cuda.train.batch, cuda.train.dtype) == (4096, "bfloat16")
    mine = PipelineConfig(data=DataConfig(device="cuda"),
                          train=TrainConfig(batch=512, dtype="float32"))
    assert (mine.train.batch, mine.train.dtype) == (512, "float32")
    assert mine.flags()["batch"] == 512  # run.json records what ran
    with pytest.raises(ValueError, match="--tokens must be >= 4096"):
        PipelineConfig(data=DataConfig(device="cuda"), train=TrainConfig(tokens=1000))
    # a Trainer given an unset config fills it the same way
    tr = Trainer([SAESpec("per-layer/L00", "per-layer", [0], 16)], TrainConfig(k=2), "x",
                 d_model=8, scales={0: 1.0}, total_tokens=1024)
    assert (tr.cfg.batch, tr.cfg.dtype) == (256, "float32")


def test_firing_counts_land_on_each_rows_member_layer():
    spec = SAESpec("groups/L00-L02", "groups", [0, 1, 2], 16)
    tr = Trainer([spec], TrainConfig(k=2, batch=64, init_b_dec="zero"), "x", d_model=8,
                 scales={0: 1.0, 1: 0.5, 2: 2.0}, total_tokens=640)  # (b_dec stays as encoded)
    batch = {v: torch.randn(64, 8) + v for v in (0, 1, 2)}
    x, layer = tr._inputs(0, batch, None)  # the rows and member layers step 0 will draw
    acts, idx = tr.saes[0].encode(x, layer)  # before the step changes the weights
    pos = layer  # members 0, 1, 2 are layers 0, 1, 2
    expected = torch.zeros(3, 16, dtype=torch.int64)
    for r in range(64):
        for a, i in zip(acts[r], idx[r]):
            expected[pos[r], i] += int(a > 0)
    tr.train_batch(batch)
    assert torch.equal(tr.fire_counts[0], expected)
    assert torch.equal(tr.layer_tokens[0], torch.bincount(pos, minlength=3))


def test_host_reads_in_the_sae_step_are_the_known_ones():
    """Every read of a tensor value into Python (aten._local_scalar_dense: .item(), bool(), int())
    and every nonzero is a host sync when the tensor is on a GPU. A step with dead latents makes
    exactly these: the finiteness guard before the update, the dead latents' nonzero that sizes
    the AuxK output and, for per-token layers, their validation, which reads the layer tensor
    where it lives (the trainer keeps it on the host: no device read). The AuxK weight, the dead
    mask's any() (decided on the host counters) and the firing flags no longer read the device.
    Counted on the CPU, where the same ops run; reintroducing any device read fails this."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lgsae.step import make_optimizer, train_step

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero):
                self.calls.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    x = torch.randn(128, 32)
    # with lazy_check (what the trainer uses on CUDA) the finiteness guard reads nothing; the
    # group SAE's read is the per-token layers' validation, and the nonzero is AuxK's dead
    # indices: both on host tensors in the trainer (free there; on the device on CUDA they
    # would be syncs), so on CUDA a trainer step reads nothing back before its one copy
    for layers, layer, lazy, expected in (
            ([3], 3, False, ["_local_scalar_dense", "nonzero"]),
            ([3], 3, True, ["nonzero"]),
            ([0, 1], torch.randint(0, 2, (128,)), False,
             ["_local_scalar_dense", "_local_scalar_dense", "nonzero"]),
            ([0, 1], torch.randint(0, 2, (128,)), True, ["_local_scalar_dense", "nonzero"])):
        sae = GroupSAE(32, k=4, num_latents=64, layers=layers, seed=0)
        opt = make_optimizer(sae)
        train_step(sae, opt, x, layer=layer, dead_mask=dead)  # warm-up (lazy state)
        with Count() as c:
            train_step(sae, opt, x, layer=layer, dead_mask=dead, lazy_check=lazy)
        assert sorted(c.calls) == expected, (layers, lazy, c.calls)


def test_lazy_finiteness_guard_skips_the_update_and_stops_the_run():
    """lazy_check: a non-finite loss makes the fused Adam skip the update on the device (weights
    and Adam state as before); the trainer then stops, naming the SAE, its layers and the step."""
    from lgsae.step import is_fused, make_optimizer, train_step

    sae = GroupSAE(16, k=2, num_latents=32, layers=[0], seed=0)
    opt = make_optimizer(sae)
    assert is_fused(opt)  # torch's fused Adam runs on the CPU too
    train_step(sae, opt, torch.randn(64, 16), layer=0, lazy_check=True)  # a good step
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    adam = {k: v.clone() for k, v in opt.state[sae.W_dec].items()}
    flat = torch.ones(64, 16)  # zero variance: FVU = 0/0
    out = train_step(sae, opt, flat, layer=0, lazy_check=True)
    assert not torch.isfinite(out.fvu)
    for k, v in sae.state_dict().items():  # W_dec: renormed rows that were unit already
        assert torch.allclose(v, before[k], rtol=0, atol=1e-6 if k == "W_dec" else 0), k
    for k, v in opt.state[sae.W_dec].items():
        assert torch.equal(v, adam[k]), k
    with pytest.raises(FloatingPointError, match="the step was not taken"):
        train_step(sae, opt, flat, layer=0)  # the eager guard, before the backward

    spec = SAESpec("per-layer/L00", "per-layer", [0], 32)
    tr = Trainer([spec], TrainConfig(k=2, batch=64), "x", d_model=16, scales={0: 1.0},
                 total_tokens=640)
    tr.lazy_check = True  # as on CUDA
    tr.train_batch({0: torch.randn(64, 16)})
    kept = {k: v.clone() for k, v in tr.saes[0].state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"per-layer/L00 \(layers \[0\]\) in step 1"):
        tr.train_batch({0: flat})
    for k, v in tr.saes[0].state_dict().items():
        assert torch.allclose(v, kept[k], rtol=0, atol=1e-6 if k == "W_dec" else 0), k


def test_the_clip_inside_fused_adam_is_clip_grad_norm_then_adam():
    """train_step folds the grad-norm clip into fused Adam's grad_scale instead of rescaling every
    gradient first. Over steps where the clip bites and where it does not, the weights must follow
    the textbook step (clip_grad_norm_, then a plain for-loop Adam) to fp32 rounding."""
    from lgsae.step import AUXK_COEF, CLIP_NORM, is_fused, make_optimizer, train_step

    ours, ref = (GroupSAE(16, k=3, num_latents=48, seed=0) for _ in range(2))
    opt = make_optimizer(ours, lr=1e-2)
    assert is_fused(opt)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, betas=(0.9, 0.999), foreach=False)
    gen, norms = torch.Generator().manual_seed(0), []
    for i in range(8):
        x = torch.randn(64, 16, generator=gen) * (0.05 if i % 2 else 1.0)  # small x: big grads
        train_step(ours, opt, x)
        out = ref(x)
        ref_opt.zero_grad(set_to_none=True)
        (out.fvu + AUXK_COEF * out.auxk_loss).backward()
        ref.project_decoder_grad_()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP_NORM)))
        ref_opt.step()
        ref.renorm_decoder_()
    assert min(norms) < CLIP_NORM < max(norms), norms  # both regimes were exercised
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert_close(p, q, atol=1e-5, name=name)


def test_eval_at_milestones_evaluate_per_layer_saes_part_way(tiny, tmp_path, monkeypatch):
    """--eval-at equal-compute,1024: the per-layer SAEs saved at those steps are evaluated as
    methods of their own, with paired differences against them; equal compute is the step where
    the per-layer SAEs have cost what the group SAEs cost in the whole run."""
    monkeypatch.setenv("LGSAE_CACHE", str(tiny["cache"]))
    run = tmp_path / "run"
    m = main(flags(tiny, run, "--groups", "0-2;3", "--eval-at", "equal-compute,1024"))
    # 3 group SAEs (0-2, 3, and the last layer alone) against 5 per-layer SAEs of equal width:
    # 2048 x 3/5 = 1228.8 tokens -> 5 steps of 256 = 1280
    assert set(m["milestones"]) == {"per-layer@1280", "per-layer@1024"}
    assert m["milestones"]["per-layer@1280"]["equal_compute"]
    assert not m["milestones"]["per-layer@1024"]["equal_compute"]
    full, part = m["methods"]["per-layer"], m["methods"]["per-layer@1280"]
    assert part["tokens_train"] == 1280 and full["tokens_train"] == 2048
    assert part["n_saes"] == 5 and set(part["per_layer"]) == set(full["per_layer"])
    assert part["flops"] == pytest.approx(full["flops"] * 1280 / 2048, rel=0.02)  # kept rows
    groups_flops = m["methods"]["groups"]["flops"]
    assert part["flops"] == pytest.approx(groups_flops, rel=0.05)  # equal compute, to a step
    # the snapshot is what the per-layer SAE was at step 5, not its final state
    snap = GroupSAE.load(run / "milestones" / "1280" / "per-layer" / "L00")
    final = GroupSAE.load(run / "saes" / "per-layer" / "L00")
    assert not torch.equal(snap.W_dec, final.W_dec)
    paired = m["milestones"]["per-layer@1280"]["paired"]["groups"]["fvu"]
    assert paired["diff"] == pytest.approx(m["methods"]["groups"]["fvu"] - part["fvu"], abs=1e-9)
    assert "after 1,280 tokens (per-layer@1280, equal compute" in (run / "report.md").read_text()


def test_eval_at_bad_values_are_one_clear_error(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LGSAE_CACHE", str(tiny["cache"]))
    for bad, match in (("half", "neither a token count"), ("4096", "between 0 and --tokens")):
        with pytest.raises(SystemExit):  # the flag parser's error, naming the flag
            main(flags(tiny, tmp_path / bad, "--eval-at", bad))
        assert match in " ".join(capsys.readouterr().err.replace("│", " ").split())
        assert not (tmp_path / bad).exists()
    with pytest.raises(SystemExit):
        main(flags(tiny, tmp_path / "nb", "--eval-at", "equal-compute", "--baselines", "none"))
    assert "add per-layer to --baselines" in " ".join(
        capsys.readouterr().err.replace("│", " ").split())
    assert not (tmp_path / "nb").exists()


def test_preset_expands_to_its_flags_and_given_flags_win():
    from lgsae.config import PipelineConfig, parse
    from lgsae.train import PRESETS, expand_preset

    argv = expand_preset(["--out", "x", "--preset", "paper-table", "--tokens", "950000"])
    assert argv[:len(PRESETS["paper-table"])] == list(PRESETS["paper-table"])
    c = parse(PipelineConfig, argv, "t")
    assert c.train.tokens == 950_000 and c.train.batch == 1024  # given flag wins, preset fills
    assert c.train.baselines == "per-layer,even,smaller,single"
    assert c.train.eval_at == "equal-compute" and c.data.model_dtype == "bfloat16"
    assert expand_preset(["--preset=paper-table"]) == list(PRESETS["paper-table"])
    ablation = parse(PipelineConfig, expand_preset(["--preset", "group-design"]), "t").train
    assert ablation.group_variants == "b_dec,b_enc,scale,b_dec+b_enc+scale"
    assert ablation.tokens == 1_024_000 and ablation.lr_scale == 4 and ablation.dtype == "bfloat16"
    with pytest.raises(ValueError, match="choose one of paper-table"):
        expand_preset(["--preset", "nope"])


def test_initialisation_b_dec_at_the_first_batch_mean_and_encoder_norm():
    """Before the first step b_dec is the mean of the first batch's kept rows in the scaled space
    (each row times its member layer's scale); encoder rows start at --encoder-norm times the
    unit decoder rows; --init-b-dec zero keeps the paper's start."""
    spec = SAESpec("groups/L00-L02", "groups", [0, 1, 2], 16)
    scales = {0: 1.0, 1: 0.5, 2: 2.0}
    cfg = TrainConfig(k=2, batch=64, lr=1e-12)  # a step that barely moves b_dec
    tr = Trainer([spec], cfg, "x", d_model=8, scales=scales, total_tokens=640)
    sae = tr.saes[0]
    assert torch.allclose(sae.encoder.weight.norm(dim=1), torch.full((16,), 0.58))
    assert torch.allclose(sae.encoder.weight / 0.58, sae.W_dec)
    g = torch.Generator().manual_seed(3)
    batch = {v: torch.randn(64, 8, generator=g) * 3 + 5 * v for v in (0, 1, 2)}
    keep = torch.ones(64, dtype=torch.bool)
    keep[::5] = False
    batch["keep"] = keep
    x, layer = tr._inputs(0, batch, keep)
    want = (x.double() * torch.tensor([scales[int(v)] for v in layer],
                                      dtype=torch.float64)[:, None]).mean(0)
    lone = GroupSAE(8, k=2, num_latents=16, layers=[0, 1, 2], scales=list(scales.values()))
    lone.init_b_dec_(x, layer)  # the same start outside the trainer
    assert torch.allclose(lone.b_dec.double(), want, atol=1e-6)
    tr.train_batch(batch)
    assert torch.allclose(sae.b_dec.double(), want, atol=1e-6)
    tr.train_batch({**batch, 0: batch[0] + 100})  # only the first batch sets it
    assert torch.allclose(sae.b_dec.double(), want, atol=1e-6)
    zero = Trainer([spec], TrainConfig(k=2, batch=64, init_b_dec="zero", encoder_norm=1.0,
                                       lr=1e-6), "x", d_model=8, scales=scales, total_tokens=640)
    assert torch.allclose(zero.saes[0].encoder.weight, zero.saes[0].W_dec)
    zero.train_batch(batch)
    assert zero.saes[0].b_dec.abs().max() <= 1.01e-6  # one Adam step (of size lr) from zero


def test_a_variant_starts_and_draws_like_the_plain_group_sae():
    """groups+scale over the same layers as groups: same initial weights, same layer draws at
    every step, so an ablation measures the option and not a seed."""
    specs = [SAESpec("groups/L00-L02", "groups", [0, 1, 2], 16),
             SAESpec("per-layer/L00", "per-layer", [0], 16),
             SAESpec("groups+scale/L00-L02", "groups+scale", [0, 1, 2], 16, ["scale"])]
    tr = Trainer(specs, TrainConfig(k=2, batch=64), "x", d_model=8,
                 scales={0: 1.0, 1: 0.5, 2: 2.0}, total_tokens=640)
    plain, variant = tr.saes[0], tr.saes[2]
    assert torch.equal(plain.W_dec, variant.W_dec) and tr.seed_keys == [0, 1, 0]
    batch = {v: torch.randn(64, 8) for v in (0, 1, 2)}
    for step in range(3):
        tr.step = step
        (xa, la), (xb, lb) = tr._inputs(0, batch, None), tr._inputs(2, batch, None)
        assert torch.equal(la, lb) and torch.equal(xa, xb)
    assert not torch.equal(tr._inputs(1, batch, None)[0], tr._inputs(0, batch, None)[0])


def test_per_layer_b_dec_starts_at_each_member_layers_mean():
    """With the per-member-layer b_dec, the trainer's start puts b_dec at the batch mean and
    b_dec + Δb_dec[l] at layer l's own mean (scaled space, kept rows only)."""
    spec = SAESpec("groups+b_dec/L00-L02", "groups+b_dec", [0, 1, 2], 16, ["b_dec"])
    scales = {0: 1.0, 1: 0.5, 2: 2.0}
    tr = Trainer([spec], TrainConfig(k=2, batch=64, lr=1e-12), "x", d_model=8, scales=scales,
                 total_tokens=640)
    sae = tr.saes[0]
    assert sae.layer_params == ("b_dec",)
    g = torch.Generator().manual_seed(4)
    batch = {v: torch.randn(64, 8, generator=g) + 7 * v for v in (0, 1, 2)}
    keep = torch.ones(64, dtype=torch.bool)
    keep[::3] = False
    batch["keep"] = keep
    x, layer = tr._inputs(0, batch, keep)
    xs = x.double() * torch.tensor([scales[int(v)] for v in layer], dtype=torch.float64)[:, None]
    tr.train_batch(batch)
    assert torch.allclose(sae.b_dec.double(), xs.mean(0), atol=1e-6)
    for j, v in enumerate(spec.layers):
        assert torch.allclose((sae.b_dec + sae.layer_b_dec[j]).double(), xs[layer == v].mean(0),
                              atol=1e-6), v


def test_group_variants_train_beside_the_plain_groups_and_compare_paired(tiny, tmp_path,
                                                                         monkeypatch):
    """--group-variants adds the groups again with per-member-layer options as methods of their
    own; metrics.json gets paired differences against smaller and (for the variants) against the
    plain groups; the export folds the options in."""
    from lgsae.export import export

    monkeypatch.setenv("LGSAE_CACHE", str(tiny["cache"]))
    run = tmp_path / "run"
    m = main(flags(tiny, run, "--groups", "0-2;3", "--baselines", "per-layer,even,smaller",
                   "--group-variants", "b_dec+scale,b_enc"))
    assert list(m["methods"]) == ["groups", "groups+b_dec+scale", "groups+b_enc", "per-layer",
                                  "even", "smaller"]
    cfg = json.loads((run / "saes" / "groups+b_dec+scale" / "L00-L02" / "cfg.json").read_text())
    assert cfg["layer_params"] == ["b_dec", "scale"]
    assert json.loads((run / "saes" / "groups" / "L00-L02" / "cfg.json").read_text())[
        "layer_params"] == []  # the plain groups stay plain
    assert json.loads((run / "saes" / "groups+b_enc" / "L04" / "cfg.json").read_text())[
        "layer_params"] == []  # and a one-layer SAE never has options
    vs = m["paired_vs"]
    assert set(vs) == {"smaller", "groups"}
    d = vs["groups"]["groups+b_dec+scale"]["fvu"]
    assert d["diff"] == pytest.approx(m["methods"]["groups+b_dec+scale"]["fvu"]
                                      - m["methods"]["groups"]["fvu"], abs=1e-9)
    assert d["ci95"][0] <= d["diff"] <= d["ci95"][1]
    assert vs["smaller"]["groups"]["fvu"]["diff"] == pytest.approx(
        m["methods"]["groups"]["fvu"] - m["methods"]["smaller"]["fvu"], abs=1e-9)
    report = (run / "report.md").read_text()
    assert "against the plain group SAEs" in report and "| groups+b_enc |" in report
    assert (run / "per_layer_variants.png").is_file() and "per_layer_variants.png" in report
    # the served SAE and its export (a plain TopK SAE on raw activations) reconstruct alike
    folders = export(run, "sparsify", tmp_path / "exp", methods=["groups+b_dec+scale"])
    assert len(folders) == 5
    sae = GroupSAE.load(run / "saes" / "groups+b_dec+scale" / "L00-L02")
    assert float(sae.layer_b_dec.abs().max()) > 0 and float(sae.layer_log_gain.abs().max()) > 0
    x = 3 * torch.randn(40, sae.d_in)
    w = load_file(next(f for f in folders if f.name.endswith(".1")) / "sae.safetensors")
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].t() + w["encoder.bias"])
    vals, ids = pre.topk(sae.k, 1)
    recon = torch.zeros_like(pre).scatter(1, ids, vals) @ w["W_dec"] + w["b_dec"]
    assert torch.allclose(recon, sae(x, layer=1).recon, atol=1e-4, rtol=1e-4)
