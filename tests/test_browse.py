"""The latent browser (lgsae.browse): its records against a direct count, its held-out text, and
the built site in a real headless Chromium (Debian's package, driven by playwright)."""

import base64
import gzip
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_dir, write_texts

from lgsae.browse import build, held_out_ids, run_saes, slug
from lgsae.capture import kept_positions, special_ids
from lgsae.models import load_model, load_tokenizer
from lgsae.sources import Forward, make_layout
from lgsae.train import main as train


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A tiny finished run (a 5-layer model: groups and per-layer SAEs) and its site."""
    d = tmp_path_factory.mktemp("browse")
    model = tiny_model_dir(d / "m", n_layers=5)
    text = write_texts(d / "t.jsonl", n_docs=300)
    run = d / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("LGSAE_CACHE", str(d / "cache"))
    train(["--model", model, "--dataset", text, "--tokens", "2048", "--eval-tokens", "128",
           "--stat-tokens", "256", "--ctx", "32", "--batch", "256", "--buffer-tokens", "1024",
           "--expansion", "2", "--k", "4", "--checkpoint-minutes", "0", "--out", str(run),
           "--no-progress", "--groups", "0-2;3", "--no-browse"])
    info = build(run, d / "site", tokens=512, top=5, n_random=2, progress=False)
    mp.undo()
    return {"run": run, "site": Path(info["path"]), "info": info, "model": model}


def unpack(path: Path) -> list:
    """The arguments of the LGSAE.* call in a data file, the packed one decoded."""
    call = path.read_text()
    args = json.loads("[" + re.match(r"LGSAE\.\w+\((.*)\);\s*$", call, re.S).group(1) + "]")
    args[-1] = json.loads(gzip.decompress(base64.b64decode(args[-1])))
    return args


def records(site, name: str):
    d = site["site"] / "data" / slug(name)
    summary = unpack(d / "latents.js")[-1]
    detail = {}
    for f in sorted(d.glob("[0-9]*.js")):
        detail.update({int(k): v for k, v in unpack(f)[-1].items()})
    return summary, detail


def direct(site, sae, ids):
    """Firing counts [members, M] and each latent's largest activation, counted here."""
    flags = json.loads((site["run"] / "run.json").read_text())
    model = load_model(flags["model"])
    keep = kept_positions(ids, special_ids(load_tokenizer(flags["model"]))).reshape(-1)
    acts = Forward(model, sae.layers, batch_size=8, store=torch.float32, device="cpu")(ids)
    counts = torch.zeros(len(sae.layers), sae.num_latents, dtype=torch.long)
    best = torch.zeros(sae.num_latents)
    dense = {}
    for v in sae.layers:
        with torch.no_grad():
            z = sae.encode_dense(acts[v], layer=v)
        dense[v] = z * keep[:, None]  # [rows, M], left-out positions never fire
        counts[sae.layers.index(v)] = (dense[v] > 0).sum(0)
        best = torch.maximum(best, dense[v].max(0).values)
    return counts, best, dense


def test_records_match_a_direct_count(site):
    flags = json.loads((site["run"] / "run.json").read_text())
    ids = held_out_ids(flags, load_tokenizer(flags["model"]), 512 // 32)
    for name, _, sae in run_saes(site["run"]):
        summary, detail = records(site, name)
        counts, best, dense = direct(site, sae, ids)
        assert summary["count"] == counts.sum(0).tolist(), name
        total = counts.sum(0).clamp(min=1)
        for j in range(sae.num_latents):
            assert summary["share"][j] == pytest.approx((counts[:, j] / total[j]).tolist(),
                                                        abs=1e-3)
            top = detail[j]["top"]
            assert len(top) == min(5, int(counts[:, j].sum()))
            if top:  # best first, and the best is the latent's largest activation
                assert top[0][2] == pytest.approx(float(best[j]), rel=1e-2)
                assert [e[2] for e in top] == sorted((e[2] for e in top), reverse=True)
                assert top[0][0] in sae.layers
            assert len(detail[j]["random"]) <= 2
            tops = {(e[0], e[1]) for e in top}
            assert not tops & {(e[0], e[1]) for e in detail[j]["random"]}
            for layer, row, act, w in top + detail[j]["random"]:
                # the example itself, then its window: the latent's other non-zero activations
                # in the same context, as [offset, % of the example's activation, ...]
                assert act == pytest.approx(float(dense[layer][row, j]), rel=1e-2)
                z = dense[layer][:, j]
                want = [o for o in range(-10, 5) if o and 0 <= row + o < z.numel() and
                        (row + o) // 32 == row // 32 and z[row + o] > 0]
                assert w[0::2] == want
                for o, p in zip(w[0::2], w[1::2]):
                    assert p == pytest.approx(100 * float(z[row + o]) / act, abs=1)
        assert "lens" in detail[0] and len(detail[0]["lens"]) == 8


def test_held_out_text_is_disjoint_from_statistics_and_training(site):
    flags = json.loads((site["run"] / "run.json").read_text())
    tok = load_tokenizer(flags["model"])
    lay = make_layout(ctx=32, stat_tokens=256, eval_tokens=128, train_tokens=2048,
                      buffer_tokens=1024, fwd_batch=flags["fwd_batch"], batch=256)
    from lgsae.sources import context_batches
    text = {"dataset": flags["dataset"], "seed": 0}
    every = torch.cat(list(context_batches(tok, text, ctx=32, start=0, count=lay.total_contexts
                                           + 12, per=64)))
    got = held_out_ids(flags, tok, lay.eval_contexts + 12)
    want = torch.cat([every[lay.stat_contexts:lay.train_start], every[lay.total_contexts:]])
    assert torch.equal(got, want)


def test_bad_input_is_one_clear_error(site, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished lgsae run"):
        build(tmp_path, tmp_path / "out", progress=False)
    other = tmp_path / "taken"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a site written by lgsae.browse"):
        build(site["run"], other, progress=False)
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="not in this run"):
        build(site["run"], tmp_path / "x", methods="nope", progress=False)


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed (.ci/setup installs it: "
                    "apt-get install -y chromium)")
    return path


def test_site_in_headless_chromium(site):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    name = next(n for n, _, s in run_saes(site["run"]) if len(s.layers) > 1)
    summary, detail = records(site, name)
    j = max(range(summary["M"]), key=lambda i: (summary["count"][i], -i))  # the list's first
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((site["site"] / "index.html").as_uri())
        page.wait_for_selector("#stats")
        page.select_option("#sae", name)  # pick the group SAE ...
        page.wait_for_function("document.title.startsWith(%s)" % json.dumps(name))
        page.click(f'.row[data-latent="{j}"]')  # ... and a latent in its list
        page.wait_for_function(f"location.hash.endsWith('/{j}')")
        page.wait_for_selector(f'#title:has-text("latent {j}")')
        stats = page.locator("#stats")
        assert int(stats.get_attribute("data-count")) == summary["count"][j]
        assert float(stats.get_attribute("data-freq")) == summary["freq"][j]
        bars = page.locator(".bar")
        assert bars.count() == len(summary["layers"])
        for m, v in enumerate(summary["layers"]):
            bar = page.locator(f'.bar[data-layer="{v}"]')
            assert float(bar.get_attribute("data-share")) == summary["share"][j][m]
            assert bar.locator(".pct").inner_text() == f"{100 * summary['share'][j][m]:.1f} %"
        shown = page.locator("#top .ex")
        assert shown.count() == len(detail[j]["top"])
        acts = sorted((float(shown.nth(i).get_attribute("data-act")) for i in
                       range(shown.count())), reverse=True)
        assert acts == [e[2] for e in detail[j]["top"]]
        assert page.locator("#random .ex").count() == len(detail[j]["random"])
        # a shared link opens the same latent
        page.goto((site["site"] / "index.html").as_uri() + f"#{name}/{j}")
        page.reload()
        page.wait_for_selector(f'#title:has-text("latent {j}")')
        assert page.locator("#stats").get_attribute("data-count") == str(summary["count"][j])
        browser.close()
    assert not errors, errors
