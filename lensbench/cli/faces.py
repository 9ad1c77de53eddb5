"""`lensbench app`, `report`, `demo`: the workbench, the static report and the main job."""
from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

from ..errors import LensbenchError
from .demo import DemoConfig, run_demo
from .registry import command


def _check_port_free(host: str, port: int) -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, port))
    except OSError as exc:
        raise LensbenchError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pass another --port, "
                             f"or stop what is using it") from None


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="lensbench-out/demo",
                    help="results folder (a rerun replaces the previous demo's results as a whole)")
    p.add_argument("--max-tokens", type=int, default=1024, help="calibration tokens for the profiles")


@command("demo", "the main job on the bundled models: profiles, rankings, a layer-drop and a "
                      "mixed-precision plan applied and evaluated, the HTML report", _demo_arguments)
def cmd_demo(args) -> int:
    run_demo(args.out, DemoConfig(calibration_tokens=args.max_tokens))
    return 0


def _app_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("profiles", nargs="*", help="profile directories or profile.json files")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8050)


@command("app", "the Dash workbench over one or more profiles", _app_arguments)
def cmd_app(args) -> int:
    from ..app import create_app  # heavy: dash, only for this command

    if not args.profiles:
        raise LensbenchError("no profile to open: lensbench app PROFILE_DIR [PROFILE_DIR ...]")
    _check_port_free(args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lensbench: warning: --host {args.host} makes the app reachable from other machines; it has no "
              f"authentication: anyone who can reach this port can open the profiles on its command line",
              file=sys.stderr)
    app = create_app(args.profiles)
    bad = [o for o in app.lensbench_state.opened.values() if o.profile is None]
    if len(bad) == len(app.lensbench_state.opened):  # nothing to show: say so instead of serving empty pages
        raise LensbenchError(f"no profile could be opened ({bad[0].path}: {bad[0].error})")
    for o in bad:  # shown in the app too; a typo should not need a browser to be seen
        print(f"lensbench: warning: {o.path}: {o.error}", file=sys.stderr)
    print(f"lensbench app on http://{args.host}:{args.port}/ (Ctrl-C to stop)")
    app.run(host=args.host, port=args.port, debug=False)
    return 0


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--eval", action="append", metavar="EVAL.json",
                    help="a lensbench evaluate record to show in the Plans section (repeatable)")


@command("report", "a static self-contained HTML report of a profile", _report_arguments, out_is_file=True)
def cmd_report(args) -> int:
    from ..app import write_report  # heavy: dash and plotly, only for this command

    evals = {}
    for f in args.eval or []:
        label = Path(f).name.removesuffix(".json").removesuffix(".eval")
        try:
            evals[label] = json.loads(Path(f).read_text())
        except (OSError, ValueError) as exc:
            raise LensbenchError(f"--eval {f}: not a readable evaluation record ({exc}); give a file that "
                                 f"lensbench evaluate wrote") from None
        if not isinstance(evals[label], dict) or "kl_to_dense" not in evals[label]:
            raise LensbenchError(f"--eval {f} is not an evaluation record: give a file that lensbench evaluate wrote")
    path = write_report(args.profile, args.out, evals)
    print(f"wrote {path}")
    return 0
