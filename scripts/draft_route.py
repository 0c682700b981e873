"""Count the route of one greedy draft through the code: the project's functions a steady-state round enters,
from the edge's ``run_generate`` (what ``sled-edge generate`` runs) to the applied verdict, and their files.

Runs a real verifier (``sled_verifier.__main__.serve``) and the edge's ``run_generate`` in one process and one
event loop against a real Mosquitto (the transport every version of the code has), traces every thread with
``sys.setprofile``, and reports round ``--round`` (seq; round 0 carries the context and the prefill): the
functions entered between the verdict of the round before being applied and this round's being applied, plus
the edge's frames above them (run_generate, generate). Only functions in sled_edge, sled_protocol and
sled_verifier count (not torch, onnxruntime, aiomqtt or the standard library), and no comprehensions; a
coroutine resumed in the round is on the route but not a new call.

    python scripts/draft_route.py [--root TREE] [--round 2] [--no-proactive] [--list]

``--root`` is a source tree (default: this one), e.g. a ``git archive`` of an older commit, run with this
venv; the models are this checkout's tiny build (``make tiny``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dis
import functools
import inspect
import io
import os
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
PACKAGES = ("sled_edge", "sled_protocol", "sled_verifier")
RESUMABLE = inspect.CO_COROUTINE | inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR
COMPREHENSIONS = ("<genexpr>", "<listcomp>", "<dictcomp>", "<setcomp>")  # expressions, not calls a reader follows


@functools.cache
def first_resume(code) -> int:
    """Offset of a code object's first RESUME: where a fresh coroutine frame stands at its first entry."""
    return next(i.offset for i in dis.get_instructions(code) if i.opname == "RESUME")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(HERE), help="source tree to trace [default: this one]")
    parser.add_argument("--round", type=int, default=2, help="round (seq) to report [default 2]")
    parser.add_argument("--no-proactive", action="store_true", help="draft after each verdict only (the code "
                        "before proactive drafting had no choice)")
    parser.add_argument("--list", action="store_true", help="print the functions in the order first entered")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    sys.path.insert(0, str(root))
    os.chdir(root)
    prefixes = tuple(str(root / package) + os.sep for package in PACKAGES)
    events: list[tuple[tuple[str, str], bool]] = []  # ((file, qualname), a call not a resume), every thread
    applied: list[int] = []              # index into events after each EdgeSession.apply returned
    stacks: dict[int, list[tuple[str, str]]] = {}  # the edge's project frames above apply, per round

    def profile(frame, event, arg):
        if event not in ("call", "return"):
            return
        filename = frame.f_code.co_filename
        if not filename.startswith(prefixes):
            return
        name = (filename[len(str(root)) + 1 :], frame.f_code.co_qualname)
        if event == "call" and not name[1].endswith(COMPREHENSIONS):
            # A coroutine's or generator's frame is entered again at each resume: on the route, not a new call.
            fresh = not frame.f_code.co_flags & RESUMABLE or frame.f_lasti <= first_resume(frame.f_code)
            events.append((name, fresh))
        elif frame.f_code.co_qualname == "EdgeSession.apply":
            applied.append(len(events))
            outer, above = frame.f_back, []
            while outer is not None:
                if outer.f_code.co_filename.startswith(prefixes):
                    above.append((outer.f_code.co_filename[len(str(root)) + 1 :], outer.f_code.co_qualname))
                outer = outer.f_back
            stacks[len(applied) - 1] = above

    asyncio.run(run(root, profile, False if args.no_proactive else None))
    start, end = applied[args.round - 1], applied[args.round]
    window = events[start:end]
    route: dict[tuple[str, str], int] = {}  # function -> calls (a function only resumed here counts 0)
    for name, fresh in [*((name, True) for name in reversed(stacks[args.round])), *window]:
        route[name] = route.get(name, 0) + fresh
    files = sorted({file for file, _ in route})
    if args.list:
        for (file, function), count in route.items():
            print(f"{file:34} {function}" + (f"  x{count}" if count > 1 else ""))
    print(f"round {args.round}: {len(route)} functions ({sum(route.values())} calls) in {len(files)} files")
    for package in PACKAGES:
        mine = {name: count for name, count in route.items() if name[0].startswith(package + "/")}
        print(f"  {package}: {len(mine)} functions ({sum(mine.values())} calls) in "
              f"{len({file for file, _ in mine})} files")
    print("files: " + " ".join(files))


async def run(root: Path, profile, proactive: bool | None) -> None:
    from sled_protocol.devbroker import start_dev_broker

    models = HERE / "models" / "build" / "tiny"
    with tempfile.TemporaryDirectory() as workdir:
        broker, port = start_dev_broker(Path(workdir))
        try:
            await trace_generation(f"mqtt://127.0.0.1:{port}", models, profile, proactive)
        finally:
            broker.terminate()
            broker.wait()


async def trace_generation(url: str, models: Path, profile, proactive: bool | None) -> None:
    from sled_edge.__main__ import run_generate
    from sled_edge.config import EdgeConfig
    from sled_protocol.logs import configure_logging
    from sled_verifier.__main__ import serve
    from sled_verifier.config import VerifierConfig

    configure_logging("error")
    threading.setprofile(profile)  # before any worker thread exists: threads inherit it when they start
    sys.setprofile(profile)
    config = VerifierConfig(target=str(models / "target"), mqtt_url=url, verifier_id="route-v", threads=1,
                            metrics_port=0)
    ready = asyncio.Event()
    verifier = asyncio.create_task(serve(config, ready), name="verifier")
    try:
        await ready.wait()
        edge = EdgeConfig(draft=str(models / "drafts" / "rpi5"), mqtt_url=url, device_id="route-edge",
                          draft_tokens=4, **({} if proactive is None else {"proactive": proactive}))
        with contextlib.redirect_stdout(io.StringIO()):
            await run_generate(edge, "def main(argv):\n    parser = argparse.", 24, as_json=True)
    finally:
        verifier.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await verifier
        sys.setprofile(None)
        threading.setprofile(None)


if __name__ == "__main__":
    main()
