"""Serve a trained reward model (and/or reward functions) to PPO runs over HTTP.

    python rm/serve_reward.py OUTPUT/rm [--port 8000] [--key value ...]
    python rm/serve_reward.py config.json [--key value ...]

Binds 127.0.0.1 unless ``--host`` says otherwise, prints the URL to give PPO's
``reward_server_url``, and stops cleanly on Ctrl-C or SIGTERM.  docs/reward-server.md.
"""

import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ppo  # noqa: E402,F401  (sets the MKL environment before paddle loads)
from ppo.stages.entry import quiet_libraries, run_entry  # noqa: E402

if __name__ == "__main__":
    quiet_libraries()

import paddle  # noqa: E402

from ppo.args import ServeRewardArgs, parse_args  # noqa: E402
from ppo.core.errors import UserError  # noqa: E402
from ppo.data.base import import_user_modules  # noqa: E402
from ppo.models import cpu_gemm  # noqa: E402
from rm.server import RewardService, make_server  # noqa: E402


def model_folder_first(argv: list) -> list:
    """``OUTPUT/rm --port 1`` -> ``--model_name_or_path OUTPUT/rm --port 1``: a first argument that
    is neither a ``--key`` nor a ``.json`` file is the model to serve."""
    if argv and not argv[0].startswith("--") and not argv[0].endswith(".json"):
        return ["--model_name_or_path", argv[0], *argv[1:]]
    return argv


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(ServeRewardArgs, model_folder_first(argv))
    if args.device:
        try:
            paddle.set_device(args.device)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"device={args.device!r} is not available here: {str(e).strip().splitlines()[0]}") \
                from None
    notice = cpu_gemm.select(args.cpu_gemm)
    if notice:
        print(notice, file=sys.stderr, flush=True)
    if args.extra_modules:
        import_user_modules(args.extra_modules)
    server = None
    service = RewardService(args)
    try:
        server = make_server(service, args.host, args.port, args.max_request_bytes)
        host, port = server.server_address[:2]
        served = ", ".join(filter(None, [args.model_name_or_path and f"reward model {args.model_name_or_path}",
                                         args.reward_functions and f"functions {args.reward_functions}"]))
        print(f"serving {served} at http://{host}:{port}/score (health: http://{host}:{port}/health); "
              "Ctrl-C or SIGTERM stops", flush=True)

        def stop(signum, frame):
            threading.Thread(target=server.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        server.serve_forever(poll_interval=0.2)
    finally:
        if server is not None:
            server.server_close()
        service.close()
    print("reward server stopped", flush=True)


if __name__ == "__main__":
    run_entry(main)
