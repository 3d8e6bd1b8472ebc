"""The `shardinfer` command line. The only module that reads argv or environment variables."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

# Importing jax is fine before --host-devices is applied: XLA reads the flag when the backend
# starts (the first device query), not at import.
from shardinfer.compile_cache import DEFAULT_CACHE_DIR
from shardinfer.host_devices import set_host_devices
from shardinfer.weights.host_cache import DEFAULT_WEIGHT_CACHE_DIR

QUANTIZE_CHOICES = ("int8", "w8a8", "gguf", "q8_0", "q4_0")  # models/weights.py QUANTIZE_MODES


def _set_host_devices(n: int | None) -> None:
    """Must run before jax initialises its backend: XLA reads the flag once."""
    if n is None:
        return
    if n < 1:
        raise SystemExit(f"--host-devices must be >= 1, got {n}")
    set_host_devices(n)


def _process_age() -> float:
    """Seconds since this process started (interpreter start-up included) on Linux; elsewhere
    since this module was imported."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED_AT


_IMPORTED_AT = time.perf_counter()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardinfer", description="Sharded inference with JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("--model", default="smollm2-135m-instruct", help="registry name or path")
        cmd.add_argument("--mesh", default=None, help="e.g. data=2,model=4 (default: all on data)")
        cmd.add_argument("--host-devices", type=int, default=None, help="simulate N CPU devices")
        cmd.add_argument("--dtype", default=None, help="float32 | bfloat16 (default by platform)")
        cmd.add_argument("--quantize", default=None, choices=list(QUANTIZE_CHOICES),
                         help="int8 weights (w8a8: int8 activations too); GGUF blocks: gguf "
                              "(a .gguf file's own), q8_0, q4_0")  # fmt: skip
        cmd.add_argument(
            "--layer-loop",
            default=None,
            choices=["scan", "unrolled"],
            help="how layers run (default: unrolled on CPU, scan elsewhere)",
        )
        cmd.add_argument(
            "--weight-cache",
            default=os.environ.get("SHARDINFER_WEIGHT_CACHE", str(DEFAULT_WEIGHT_CACHE_DIR)),
            help="directory for a GGUF file's dequantized weights ('none' to disable); "
            "env SHARDINFER_WEIGHT_CACHE",
        )
        cmd.add_argument(
            "--kernel-threads",
            type=int,
            default=int(os.environ.get("SHARDINFER_GGUF_THREADS", "0")),
            help="threads per GGUF block matmul (0: XLA's pool; 1 is better on busy cores); "
            "env SHARDINFER_GGUF_THREADS",
        )
        cmd.add_argument("-v", "--verbose", action="store_true", help="log sharding decisions")
        cmd.add_argument(
            "--compilation-cache",
            default=os.environ.get("SHARDINFER_COMPILATION_CACHE", str(DEFAULT_CACHE_DIR)),
            help="directory for compiled programs ('none' to disable); "
            "env SHARDINFER_COMPILATION_CACHE",
        )

    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    common(gen)
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--max-seq-len", type=int, default=1024)
    gen.add_argument("--raw", action="store_true", help="skip the chat template")

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    common(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (loopback default)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=8, help="decode slots")
    serve.add_argument("--max-seq-len", type=int, default=None,
                       help="default: 2048 (an embedding model: its own limit)")  # fmt: skip
    serve.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="split the devices into R sub-meshes, one engine each",
    )
    serve.add_argument("--routing", default="least_loaded", choices=["least_loaded", "round_robin"],
                       help="how requests are spread over replicas")  # fmt: skip
    serve.add_argument(
        "--no-warmup",
        action="store_true",
        help="serve before compiling every step shape (default: warm up before /health "
        "reports ready)",
    )
    serve.add_argument(
        "--api-key",
        default=os.environ.get("SHARDINFER_API_KEY"),
        help="require 'Authorization: Bearer KEY' (env SHARDINFER_API_KEY)",
    )

    router = sub.add_parser("router", help="one OpenAI-compatible front over many servers")
    router.add_argument("--backend", action="append", required=True, metavar="URL",
                        help="a server's base URL, e.g. http://10.0.0.2:8000; repeat")  # fmt: skip
    router.add_argument("--policy", default="least_loaded", choices=["least_loaded", "round_robin"],
                        help="how requests are spread over backends")  # fmt: skip
    router.add_argument("--host", default="127.0.0.1", help="address to bind (loopback default)")
    router.add_argument("--port", type=int, default=8080)
    router.add_argument(
        "--api-key",
        default=os.environ.get("SHARDINFER_API_KEY"),
        help="require 'Authorization: Bearer KEY' (env SHARDINFER_API_KEY)",
    )
    router.add_argument(
        "--backend-api-key",
        default=os.environ.get("SHARDINFER_BACKEND_API_KEY"),
        help="the key to send to backends (default: pass the client's on); "
        "env SHARDINFER_BACKEND_API_KEY",
    )
    router.add_argument("--health-interval", type=float, default=1.0,
                        help="seconds between polls of each backend's /health")  # fmt: skip
    router.add_argument("--connect-timeout", type=float, default=2.0, help="seconds")
    router.add_argument("--read-timeout", type=float, default=60.0,
                        help="seconds a backend may go silent mid-answer")  # fmt: skip
    router.add_argument("-v", "--verbose", action="store_true", help="log backends coming, going")

    batch = sub.add_parser("batch", help="a JSON-lines file through the mesh, resumable")
    common(batch)
    batch.set_defaults(model=None)  # by --task: the default decoder, or the default encoder
    batch.add_argument("--input", required=True, help="JSON lines: simple or OpenAI Batch API")
    batch.add_argument("--output", required=True, help="appended to; rerun to resume")
    batch.add_argument("--errors", default=None, help="bad lines (default: <output>.errors.jsonl)")
    batch.add_argument("--task", default="generate", choices=["generate", "embed"])
    batch.add_argument("--replicas", type=int, default=1, help="sub-meshes, each its own engine")
    batch.add_argument("--shard", default="0/1", help="K/N: only the ids that hash to K of N")
    batch.add_argument("--max-batch", type=int, default=32, help="decode slots (embed: rows)")
    batch.add_argument("--max-seq-len", type=int, default=None,
                       help="default: the model's limit (generation: at most 2048)")  # fmt: skip
    batch.add_argument("--vectors", default="lines", choices=["lines", "npy"],
                       help="embed: vectors in the lines, or .npy files beside")  # fmt: skip
    batch.add_argument("--max-tokens", type=int, default=256, help="for rows that set none")
    batch.add_argument("--temperature", type=float, default=1.0, help="for rows that set none")
    batch.add_argument("--seed", type=int, default=0, help="with each id, a row's seed")
    batch.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="a progress bar (default: when stderr is a terminal)")  # fmt: skip

    bench = sub.add_parser("bench", help="decode tok/s, time to first token, bandwidth limit")
    common(bench)
    bench.add_argument("--batch-sizes", default="1,8,32")
    bench.add_argument("--new-tokens", type=int, default=128)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--prompt-lengths", default="32,512")
    bench.add_argument("--json", default=None, help="also write the numbers to this file")

    conv = sub.add_parser("convert", help="HF dir or .gguf -> sharded orbax checkpoint")
    conv.add_argument("source", help="registry name, HF directory or .gguf file")
    conv.add_argument("dest", help="a new directory")
    conv.add_argument("--mesh", default=None, help="the mesh to shard while converting")
    conv.add_argument("--host-devices", type=int, default=None)
    conv.add_argument("--dtype", default=None, help="float32 | bfloat16 (default by platform)")
    conv.add_argument("--quantize", default=None, choices=list(QUANTIZE_CHOICES),
                      help="store int8 or block weights")  # fmt: skip

    info = sub.add_parser("info", help="devices, processes, version")
    info.add_argument("--host-devices", type=int, default=None)

    launch = sub.add_parser("launch", help="N local processes forming one mesh (stand-in hosts)")
    launch.add_argument("--num-processes", type=int, required=True)
    launch.add_argument("--host-devices", type=int, default=None, help="CPU devices per process")
    launch.add_argument("rest", nargs=argparse.REMAINDER, metavar="command",
                        help="the shardinfer command each process runs")  # fmt: skip
    return p


# SamplingParams' field names in its messages, as the options generate spells them.
_SAMPLING_FLAGS = {"max_tokens": "--max-tokens", "temperature": "--temperature",
                   "top_p": "--top-p", "top_k": "--top-k", "seed": "--seed"}  # fmt: skip


def _sampling_params(args: argparse.Namespace):
    """generate's SamplingParams; its checks' messages name the options, not the fields."""
    from shardinfer.engine.sampling import SamplingParams

    try:
        return SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        )
    except ValueError as e:
        message = str(e)
        for field, flag in _SAMPLING_FLAGS.items():
            if message.startswith(field + " "):
                message = flag + message[len(field) :]
        raise ValueError(message) from None


def _int_list(option: str, text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} takes integers separated by commas, got {text!r}") from None
    if any(v < 1 for v in values):
        raise ValueError(f"{option} values must be >= 1, got {text!r}")
    return values


def _at_least(option: str, value: int, least: int) -> None:
    if value < least:
        raise ValueError(f"{option} must be >= {least}, got {value}")


def _check_args(args: argparse.Namespace) -> None:
    """Refuses bad arguments before anything loads (a model takes seconds): whatever can be
    checked without devices or weights is checked here, as ValueError."""
    from shardinfer.mesh import check_mesh_axes

    if args.host_devices is not None:
        _at_least("--host-devices", args.host_devices, 1)
    if args.command == "info":
        return
    try:
        check_mesh_axes(args.mesh)
    except ValueError as e:
        raise ValueError(f"--mesh {args.mesh}: {e}") from None
    if args.command == "generate":
        for i, prompt in enumerate(args.prompt):
            if not prompt.strip():
                which = "--prompt" if len(args.prompt) == 1 else f"--prompt #{i + 1}"
                raise ValueError(f"{which} is {'empty' if not prompt else 'only whitespace'}")
        _sampling_params(args)
        _at_least("--max-seq-len", args.max_seq_len, 2)
    elif args.command == "serve":
        _at_least("--max-batch", args.max_batch, 1)
        if args.max_seq_len is not None:
            _at_least("--max-seq-len", args.max_seq_len, 2)
        _at_least("--replicas", args.replicas, 1)
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be in 0-65535, got {args.port}")
    elif args.command == "batch":
        from shardinfer.batch.runner import parse_shard

        _at_least("--max-batch", args.max_batch, 1)
        if args.max_seq_len is not None:
            _at_least("--max-seq-len", args.max_seq_len, 2)
        _at_least("--max-tokens", args.max_tokens, 1)
        _at_least("--replicas", args.replicas, 1)
        if not args.temperature >= 0:
            raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
        try:
            parse_shard(args.shard)
        except ValueError as e:
            raise ValueError(f"--{e}") from None
        if not Path(args.input).is_file():
            raise ValueError(f"--input {args.input} is not a file")
    elif args.command == "bench":
        _int_list("--batch-sizes", args.batch_sizes)
        _int_list("--prompt-lengths", args.prompt_lengths)
        _at_least("--new-tokens", args.new_tokens, 2)  # the rate is over N-1 steps
        _at_least("--repeats", args.repeats, 1)


def _info() -> None:
    import jax

    import shardinfer as si

    print(f"shardinfer {si.__version__}, jax {jax.__version__}")
    print(f"process {jax.process_index()} of {jax.process_count()}")
    print(f"backend {jax.default_backend()}: {jax.local_device_count()} local device(s), "
          f"{jax.device_count()} in all")  # fmt: skip
    for d in jax.devices():
        local = " (local)" if d.process_index == jax.process_index() else ""
        print(f"  {d.id}: {d.device_kind} (process {d.process_index}){local}")


def _native_stdout_to_stderr() -> None:
    """Gloo prints a line per peer connection to the C++ stdout, from several threads at once;
    in a multi-process run that would land in the middle of a command's output. File
    descriptor 1 goes to stderr, and Python's prints keep the real stdout."""
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(real_stdout, "w", buffering=1)


def _is_master() -> bool:
    import jax

    return jax.process_index() == 0


def _print_sharding(model) -> None:
    from shardinfer.mesh import describe_mesh

    if not _is_master():
        return
    print(describe_mesh(model.mesh), file=sys.stderr)
    rows = model.sharding_table()
    width = max(len(name) for name, _, _ in rows)
    for name, shape, spec in rows:
        print(f"  {name:<{width}}  {shape!s:<18} {spec}", file=sys.stderr)


def _load_model(args: argparse.Namespace, mesh):
    """The --model with the options every model-running command shares."""
    import shardinfer as si

    cache = None if args.weight_cache.lower() == "none" else args.weight_cache
    return si.load_model(args.model, mesh=mesh, dtype=args.dtype, quantize=args.quantize,
                         layer_loop=args.layer_loop, weight_cache=cache)  # fmt: skip


def _generate(args: argparse.Namespace) -> None:
    import shardinfer as si
    from shardinfer.engine.metrics import compilations, compile_seconds

    started = time.perf_counter()
    model = _load_model(args, args.mesh)
    if _is_master():
        print(f"loaded {args.model} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    _print_sharding(model)
    cache = None if args.compilation_cache.lower() == "none" else args.compilation_cache
    llm = si.LLM(
        model,
        max_batch=len(args.prompt),
        max_seq_len=args.max_seq_len,
        compilation_cache=cache,
    )
    params = _sampling_params(args)
    compilations()  # start counting compile time before the first compile
    started = time.perf_counter()
    if args.raw:
        outs = llm.generate(args.prompt, params)
    else:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    seconds = time.perf_counter() - started
    if not _is_master():  # under launch, only process 0 prints the answer
        return
    for prompt, out in zip(args.prompt, outs, strict=True):
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        print(out.text)
    tokens = sum(len(o.token_ids) for o in outs)
    first_token_age = _process_age() - (time.perf_counter() - llm.metrics.first_token_at)
    print(
        f"{tokens} tokens in {seconds:.2f}s ({tokens / seconds:.1f} tok/s, including "
        f"{compile_seconds():.1f}s of compilation); time to first token "
        f"{llm.metrics.summary()['ttft_median_s']:.2f}s, {first_token_age:.1f}s after the "
        "process started",
        file=sys.stderr,
    )


def _bench(args: argparse.Namespace) -> None:
    import json

    from shardinfer.serving.bench import format_report, run_bench

    model = _load_model(args, args.mesh)
    _print_sharding(model)
    result = run_bench(
        model,
        _int_list("--batch-sizes", args.batch_sizes),
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        prompt_lengths=tuple(_int_list("--prompt-lengths", args.prompt_lengths)),
    )
    if _is_master():  # every process ran the same steps; process 0 reports them
        print(format_report(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))


def _run_server(args: argparse.Namespace, engine, what: str) -> None:
    """The HTTP front over `engine` (an AsyncEngine, Router or AsyncEmbedder) until SIGTERM
    has drained it; the engine stops whatever ends the server."""
    import uvicorn

    from shardinfer.serving.http import DrainingServer, create_app

    app = create_app(engine, args.model, api_key=args.api_key)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    server = DrainingServer(config, app, engine)
    where = f"http://{args.host}:{args.port}/v1"
    print(f"serving {args.model}{what} on {where}", file=sys.stderr)
    try:
        server.run()
    finally:
        engine.stop()


def _serve(args: argparse.Namespace) -> None:
    import jax

    import shardinfer as si
    from shardinfer.mesh import split_devices
    from shardinfer.model import source_family
    from shardinfer.serving.async_engine import AsyncEngine
    from shardinfer.serving.router import Router

    if source_family(args.model).kind == "encoder":
        return _serve_embeddings(args)
    if jax.process_count() > 1:
        return _serve_across_processes(args)
    engines = []
    for devices in split_devices(args.replicas):
        mesh = si.make_mesh(args.mesh, devices=devices)
        model = _load_model(args, mesh)
        if not engines:
            _print_sharding(model)
        llm = si.LLM(model, max_batch=args.max_batch, max_seq_len=args.max_seq_len)
        if not args.no_warmup:
            llm.warmup()
        engines.append(AsyncEngine(llm, replica=str(len(engines))))
    engine = engines[0] if len(engines) == 1 else Router(engines, args.routing)
    _run_server(args, engine, "")


def _serve_embeddings(args: argparse.Namespace) -> None:
    """An encoder: /v1/embeddings over one Embedder per replica (completions answer 400)."""
    import jax

    import shardinfer as si
    from shardinfer.mesh import split_devices
    from shardinfer.serving.async_embedder import AsyncEmbedder

    if jax.process_count() > 1:
        raise ValueError("serving an embedding model across processes is not supported yet; "
                         "serve it from one process (--replicas splits its devices)")  # fmt: skip
    if args.quantize:
        raise ValueError("--quantize is for generation; embeddings run unquantized")
    cache = None if args.compilation_cache.lower() == "none" else args.compilation_cache
    embedders = []
    for devices in split_devices(args.replicas):
        embedder = si.Embedder(args.model, mesh=si.make_mesh(args.mesh, devices=devices),
                               dtype=args.dtype, max_batch=args.max_batch,
                               max_seq_len=args.max_seq_len, layer_loop=args.layer_loop,
                               compilation_cache=cache)  # fmt: skip
        if not args.no_warmup:
            embedder.warmup()
        embedders.append(embedder)
    engine = AsyncEmbedder(embedders)
    _run_server(args, engine, f" (embeddings, {embedders[0].dim} dimensions)")


def _serve_across_processes(args: argparse.Namespace) -> None:
    """One engine over the mesh of every process: process 0 serves HTTP and plans, the others
    follow its plans until it shuts down (SIGTERM to them is left to process 0's drain)."""
    import signal

    import jax

    import shardinfer as si
    from shardinfer.serving.async_engine import AsyncEngine

    if args.replicas != 1:
        raise ValueError("--replicas with several processes is not supported yet")
    model = _load_model(args, si.make_mesh(args.mesh))
    _print_sharding(model)
    llm = si.LLM(model, max_batch=args.max_batch, max_seq_len=args.max_seq_len)
    if not args.no_warmup:
        llm.warmup()
    if not _is_master():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # process 0 drains, then tells us to stop
        llm.core.follow()
        return
    engine = AsyncEngine(llm)
    _run_server(args, engine, f" over {jax.process_count()} processes")


def _batch(args: argparse.Namespace) -> None:
    import shardinfer as si

    if args.model is None:  # run_batch picks the task's default model
        args.model = "smollm2-135m-instruct"
    weight_cache = None if args.weight_cache.lower() == "none" else args.weight_cache
    cache = None if args.compilation_cache.lower() == "none" else args.compilation_cache
    options = {"dtype": args.dtype, "layer_loop": args.layer_loop, "weight_cache": weight_cache}
    if args.task == "generate":
        options["quantize"] = args.quantize
    elif args.quantize:
        raise ValueError("--quantize is for generation; embeddings run unquantized")
    si.run_batch(
        args.input, args.output, args.model, errors=args.errors, task=args.task, mesh=args.mesh,
        replicas=args.replicas, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
        shard=args.shard, progress=args.progress, compilation_cache=cache, vectors=args.vectors,
        **options,
    )  # fmt: skip


def _convert(args: argparse.Namespace) -> None:
    import shardinfer as si

    model = si.load_model(
        args.source, mesh=args.mesh, dtype=args.dtype, quantize=args.quantize, layer_loop="scan"
    )
    model.save(args.dest)
    if _is_master():
        print(
            f"saved {args.source} ({model.num_params():,} parameters, {model.dtype}) to {args.dest}"
        )


def _router(args: argparse.Namespace) -> int:
    import uvicorn

    from shardinfer.serving.http import DrainingServer
    from shardinfer.serving.proxy import create_router_app

    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        app = create_router_app(
            args.backend, args.policy, api_key=args.api_key, backend_api_key=args.backend_api_key,
            connect_timeout=args.connect_timeout, read_timeout=args.read_timeout,
            health_interval=args.health_interval,
        )  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    server = DrainingServer(config, app, app.state.forwarder)
    print(f"routing over {len(args.backend)} backends on http://{args.host}:{args.port}/v1",
          file=sys.stderr)  # fmt: skip
    server.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "launch":  # a supervisor: no JAX in this process
        from shardinfer.launch import launch

        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        try:
            return launch(args.num_processes, rest, args.host_devices)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.command == "router":  # a proxy: no JAX in this process either
        return _router(args)
    try:
        _check_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _set_host_devices(args.host_devices)
    from shardinfer import distributed

    try:  # before anything starts JAX's backend; a no-op for one process
        if distributed.initialize():
            _native_stdout_to_stderr()
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    level = logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "kernel_threads", 0):
        from shardinfer import kernels

        kernels.set_threads(args.kernel_threads)
    try:
        if args.command == "info":
            _info()
        elif args.command == "generate":
            _generate(args)
        elif args.command == "serve":
            _serve(args)
        elif args.command == "bench":
            _bench(args)
        elif args.command == "convert":
            _convert(args)
        elif args.command == "batch":
            _batch(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
