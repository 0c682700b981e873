"""``make demo``: a broker, one verifier and three heterogeneous edge devices, all on this machine.

By default the target is SmolLM2-135M-Instruct (``scripts/demo_pretrained.py``: fetched from PyPI once, its GGUF
served, each device asking its own question through its own OpenAI-compatible API). ``--family quick|full|tiny``
runs the project's own 12M model family instead (built on first use), as follows.

Each device drafts with its own ONNX model and generates concurrently (plus one sampled session); the
demo prints every text, one line of statistics per session, checks each greedy output token for token
against the target model decoding alone, and reruns the sampled session to show its seed reproduces it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sled_models.build import build_family  # noqa: E402
from sled_models.recipe import PROFILES  # noqa: E402
from sled_models.tiny import build_tiny_family  # noqa: E402
from sled_protocol.devbroker import start_dev_broker  # noqa: E402

PROMPTS = {
    "jetson-orin": "def parse_args(argv):\n    parser = argparse.ArgumentParser(",
    "rpi5": "class EventLoop:\n    def run_forever(self):",
    "rpi4": "import json\n\n\ndef load(path):",
}


def wait_for_line(path: Path, needle: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while needle not in path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{needle!r} never appeared; see {path}:\n{path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)


def target_alone(target_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=model.config.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


async def acceptance_check(url: str, family: Path, manifest: dict) -> None:
    """Each device decodes the evaluation's own held-out prompts through the real system with k=4; its
    mean accepted length should be what `make models` simulated (acc_len@4) for its draft."""
    import numpy as np

    from sled_edge.client import EdgeDevice
    from sled_edge.config import EdgeConfig
    from sled_models.evaluate import _windows
    from sled_models.recipe import PROFILES as RECIPES
    from sled_protocol.logs import configure_logging

    configure_logging("error")
    recipe = RECIPES[manifest["profile"]]
    evaluation = json.loads((family / "eval.json").read_text())
    prompts = _windows(np.load(family / "tokens_held_out.npy"), recipe.eval_prompts, recipe.prompt_tokens, seed=123)

    async def device_run(device: str, spec: dict):
        config = EdgeConfig(draft=str(family / spec["path"]), mqtt_url=url, device_id=f"{device}-check",
                            verifier="demo-verifier", draft_tokens=4, timeout_s=30)
        async with EdgeDevice(config) as edge:
            results = await asyncio.gather(*(edge.generate(p, recipe.eval_tokens) for p in prompts))
        return device, spec, results

    print(f"\nacceptance check: the evaluation's {len(prompts)} held-out prompts x {recipe.eval_tokens} tokens, "
          "k=4, through broker and verifier")
    print("device        draft                 predicted acc_len@4  measured  difference")
    runs = await asyncio.gather(*(device_run(d, spec) for d, spec in manifest["drafts"].items()))
    for device, spec, results in runs:
        name = Path(spec["path"]).name
        predicted = evaluation[name]["mean_accepted_length_k4"]
        measured = sum(len(r.token_ids) / r.rounds for r in results) / len(results)
        print(f"{device:<13} {name:<21} {predicted:>19.2f}  {measured:>8.2f}  {100 * (measured / predicted - 1):>+9.1f}%")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["quick", "full", "tiny"], default=None,
                        help="the 12M model family: a trained profile (built on first use: ~15 min for quick) or the "
                             "random tiny one [default: none, SmolLM2-135M-Instruct]")
    parser.add_argument("--models", type=Path, default=None,
                        help="model family directory [default models/build/family-PROFILE or models/build/tiny]")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens per answer [default 64 for SmolLM2, 48 for the family]")
    parser.add_argument("--seed", type=int, default=7, help="seed of the sampled session")
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "demo", help="logs go here")
    args = parser.parse_args()
    if args.family is None:
        from demo_pretrained import run

        return run(args.workdir, args.max_new_tokens or 64)
    args.max_new_tokens = args.max_new_tokens or 48
    if args.family == "tiny":
        args.models = args.models or ROOT / "models" / "build" / "tiny"
        manifest = build_tiny_family(args.models)
    else:
        args.models = args.models or ROOT / "models" / "build" / f"family-{args.family}"
        if not (args.models / "manifest.json").is_file():
            print(f"building the {args.family} model family into {args.models} (first run only; progress below)")
        manifest = build_family(args.models, PROFILES[args.family])
        # Heterogeneous devices: the Jetson runs its fp32 draft, the Raspberry Pis their int8 ones.
        for name, spec in manifest["drafts"].items():
            if name.startswith("rpi"):
                spec["path"], spec["kind"] = spec["path_int8"], spec["kind"] + " int8"
    target = args.models / manifest["target"]
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    children: list[subprocess.Popen] = []
    try:
        # 1. The broker: the user's (SLED_MQTT_URL) or our dev config on a free port.
        url = os.environ.get("SLED_MQTT_URL")
        if not url:
            broker, port = start_dev_broker(args.workdir / "broker")
            children.append(broker)
            url = f"mqtt://127.0.0.1:{port}"
        print(f"broker    {url}  (inspect: sled-inspect --mqtt-url {url})")
        # 2. The verifier, with the target model.
        verifier_log = args.workdir / "verifier.log"
        with verifier_log.open("wb") as log_file:
            verifier = subprocess.Popen(
                [sys.executable, "-m", "sled_verifier", "--mqtt-url", url, "--target", str(target),
                 "--verifier-id", "demo-verifier", "--threads", "1", "--stats-interval-s", "2", "--metrics-port", "0"],
                stderr=log_file, stdout=subprocess.DEVNULL, env=env, cwd=ROOT)
        children.append(verifier)
        wait_for_line(verifier_log, "verifier_online", verifier)
        print(f"verifier  demo-verifier serving {target}  (log: {verifier_log})")
        # 3. Three devices, each with its own draft, generating at the same time.
        started = time.monotonic()
        def edge(device: str, spec: dict, *extra: str) -> subprocess.Popen:
            return subprocess.Popen(
                [sys.executable, "-m", "sled_edge", "generate", "--json", "--mqtt-url", url,
                 "--draft", str(args.models / spec["path"]), "--device-id", device, "--verifier", "demo-verifier",
                 "--prompt", PROMPTS[device.split("-sampled")[0]],
                 "--max-new-tokens", str(args.max_new_tokens), *extra],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)

        def collect(process: subprocess.Popen, device: str) -> dict:
            out, err = process.communicate(timeout=600)
            if process.returncode != 0:
                raise RuntimeError(f"edge {device} failed ({process.returncode}):\n{err}")
            return json.loads(out)

        sampled_args = ("--temperature", "0.8", "--top-p", "0.95", "--seed", str(args.seed))
        edges = {device: edge(device, spec) for device, spec in manifest["drafts"].items()}
        edges["rpi5-sampled"] = edge("rpi5-sampled", manifest["drafts"]["rpi5"], *sampled_args)
        results = {device: collect(process, device) for device, process in edges.items()}
        wall_s = time.monotonic() - started
        rerun = collect(edge("rpi5-sampled", manifest["drafts"]["rpi5"], *sampled_args), "rpi5-sampled")
        # 4. What each device got, and whether it is exactly the target's own output.
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(target / "tokenizer.json"))
        exact = {device: result["token_ids"] == target_alone(target, tokenizer.encode(PROMPTS[device]).ids,
                                                             args.max_new_tokens)
                 for device, result in results.items() if device in PROMPTS}
        exact["rpi5-sampled"] = rerun["token_ids"] == results["rpi5-sampled"]["token_ids"]
        for device, result in results.items():
            spec = manifest["drafts"][device.split("-sampled")[0]]
            mode = f"sampled T=0.8 top-p 0.95 seed {args.seed}" if "sampled" in device else "greedy"
            print(f"\n--- {device} (draft {spec['kind']}, adaptive k, {mode})")
            print(f"prompt: {PROMPTS[device.split('-sampled')[0]]!r}")
            print(f"output: {result['text']!r}")
        print("\nexact: greedy sessions compared token for token with the target alone; "
              "the sampled one rerun with its seed")
        print("\ndevice        tokens rounds  mean_k  mean_accept_len    acceptance  tokens/s  exact")
        for device, r in results.items():
            print(f"{device:<13} {len(r['token_ids']):>6} {r['rounds']:>6}  {r['draft_tokens'] / r['rounds']:>6.1f}  "
                  f"{r['mean_acceptance_length']:>17.2f}  {r['acceptance_rate']:>10.0%}  {r['tokens_per_s']:>8.1f}  "
                  f"{'yes' if exact[device] else 'NO'}")
        print(f"\n{len(results)} sessions, {sum(len(r['token_ids']) for r in results.values())} tokens in {wall_s:.1f} s wall"
              + ("; random-weight models, so the text itself is noise." if args.family == "tiny" else "."))
        if args.family != "tiny" and (args.models / "eval.json").is_file():
            asyncio.run(acceptance_check(url, args.models, manifest))
        return 0 if all(exact.values()) else 1
    finally:
        for child in reversed(children):
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()


if __name__ == "__main__":
    sys.exit(main())
