"""Put mirage's defense in front of a model server you already run, with a quota per API key.

    python examples/gateway_in_front_of_your_server.py
    python examples/gateway_in_front_of_your_server.py --upstream http://127.0.0.1:8080

1. Your classifier: a small CNN trained on scikit-learn's 8×8 digits, exported to ONNX with its
   softmax, served by MLServer 1.7.1 through a small onnxruntime runtime. MLServer runs from its
   own venv ($MIRAGE_MLSERVER_VENV, default <repo>/.venv-mlserver, which
   ``MIRAGE_TEST_SERVERS=1 bash scripts/bootstrap.sh`` installs). With ``--upstream URL`` the
   script starts nothing and uses your OIP V2 server instead: its model ``--model`` takes
   ``images`` FP32 [B, 1, 8, 8] in [0, 1] and answers one output of probabilities (B, 10).
2. GRAD² differentiates a surrogate, since the gateway's victim has no gradients: one is
   distilled from your server's own answers on your images, black-box, through the same
   ``[model.upstream]`` the gateway uses (docs/design.md §grad2-surrogate; ``mirage
   distil-surrogate --model net.onnx`` does it from the model file).
3. The gateway's config (docs/design.md §gateway): ``[model.upstream]`` names your server, the
   defense keeps every answer's top-1 label, and each client has a key and a quota. ``mirage
   serve --config gateway.toml`` runs it on 127.0.0.1.
4. Triton's own HTTP client (``tritonclient[http]``, in mirage's test extras) asks your server
   and the gateway for the same images: the undefended and the defended answers, and bob's
   request past his quota refused with a 429.

What this does not show: whether GRAD² at this budget protects your model. ``mirage evaluate``
answers that against the attacker suite (README.md, "Using it").
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import httpx
import numpy as np
import torch
import tritonclient.http as triton
from torch import nn
from tritonclient.utils import InferenceServerException

from mirage.data import load_dataset
from mirage.models import save_checkpoint
from mirage.serve.auth import new_key
from mirage.serve.config import UpstreamConfig
from mirage.serve.gateway import UpstreamModel
from mirage.training.surrogate import distil_surrogate

ROOT = Path(__file__).resolve().parents[1]
EPSILON = 0.5  # GRAD²'s L1 budget per answer
BOB_QUOTA = 4  # images, for ever

# MLServer's side: a custom runtime, imported by MLServer from the model's folder (its venv has
# numpy and onnxruntime, not mirage or torch).
RUNTIME = """
import numpy as np
import onnxruntime
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxClassifier(MLModel):
    async def load(self) -> bool:
        self.session = onnxruntime.InferenceSession(
            self.settings.parameters.uri, providers=["CPUExecutionProvider"]
        )
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        tensor = payload.inputs[0]
        x = np.asarray(NumpyCodec.decode_input(tensor), np.float32).reshape(tensor.shape)
        (probabilities,) = self.session.run(None, {"images": x})
        output = NumpyCodec.encode_output("probabilities", probabilities)
        return InferenceResponse(model_name=self.name, outputs=[output])
"""

GATEWAY = """\
[model]
name = "digits"                    # the name mirage's clients use

[model.upstream]                   # your server
url = "{url}"
model = "{model}"
input_name = "images"
input_shape = [1, 8, 8]
output = "probabilities"
timeout_s = 10.0

[defense]
name = "grad2"
params = {{ epsilon = {epsilon}, target = "all-ones", preserve_top1 = true }}
surrogate = "{surrogate}"

[storage]
database = "{database}"

[[clients]]
name = "alice"
key_sha256 = "{alice}"
quota = 100_000

[[clients]]
name = "bob"
key_sha256 = "{bob}"
quota = {bob_quota}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} was not ready in {timeout:g} s: {log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (both servers shut down gracefully on it), SIGKILL if that takes too long."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def your_classifier(images: torch.Tensor, labels: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(5):
        for index in torch.randperm(len(images)).split(128):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[index]), labels[index]).backward()
            optimizer.step()
    return model.eval()


def start_mlserver(
    model: nn.Module, example: torch.Tensor, work: Path
) -> tuple[subprocess.Popen, str]:
    """MLServer serving ``model``, with its softmax, as ``digits``: the process and its URL."""
    venv = Path(os.environ.get("MIRAGE_MLSERVER_VENV", ROOT / ".venv-mlserver"))
    if not (venv / "bin" / "mlserver").is_file():
        sys.exit(
            f"MLServer is not installed at {venv}: run MIRAGE_TEST_SERVERS=1 bash "
            "scripts/bootstrap.sh, or give --upstream URL"
        )
    folder = work / "mlserver"
    (folder / "digits").mkdir(parents=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        nn.Sequential(model, nn.Softmax(dim=1)).eval(),
        (example,),
        str(folder / "digits" / "net.onnx"),
        input_names=["images"],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        verbose=False,
    )
    (folder / "digits" / "runtime.py").write_text(RUNTIME)
    (folder / "digits" / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "digits",
                "implementation": "runtime.OnnxClassifier",
                "parameters": {"uri": str(folder / "digits" / "net.onnx")},
            }
        )
    )
    port = free_port()
    (folder / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": port,
                "grpc_port": free_port(),
                "metrics_endpoint": None,
                "parallel_workers": 0,
            }
        )
    )
    # MLServer's own venv: nothing of this interpreter's Python environment
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    url, log = f"http://127.0.0.1:{port}", work / "mlserver.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(venv / "bin" / "mlserver"), "start", str(folder)],
            cwd=folder,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_ready(f"{url}/v2/models/digits/ready", process, log)
    except BaseException:
        stop(process)
        raise
    return process, url


def start_gateway(config: Path, work: Path) -> tuple[subprocess.Popen, str]:
    """``mirage serve --config CONFIG`` on 127.0.0.1 and a free port: the process and its URL."""
    port = free_port()
    command = [
        "mirage",
        "serve",
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    print(" ".join(command))
    url, log = f"http://127.0.0.1:{port}", work / "gateway.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("mirage")), *command[1:]],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MIRAGE_PROGRESS": "0"},
        )
    try:
        wait_ready(f"{url}/v2/health/ready", process, log)
    except BaseException:
        stop(process)
        raise
    return process, url


def distil_through(upstream: dict, images: torch.Tensor, directory: Path) -> float:
    """A GRAD² surrogate distilled from the answers of the ``[model.upstream]`` server on
    ``images``, saved in ``directory``; its top-1 agreement with the server on held-out images."""
    server = UpstreamModel(UpstreamConfig.model_validate(upstream))
    try:
        ((surrogate, card),) = distil_surrogate(server, images)
    finally:
        server.close()
    save_checkpoint(surrogate, card, directory)
    return card.test_accuracy


def ask(url: str, images: np.ndarray, model: str, key: str | None = None) -> np.ndarray:
    """The probabilities (B, K) the server at ``url`` answers for ``images``: tritonclient's
    request with the images as JSON (MLServer 1.7.1 refuses binary tensor data), its answer's
    only output, in whatever form the server sends it."""
    client = triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)
    try:
        tensor = triton.InferInput("images", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images, binary_data=False)
        headers = {"Authorization": f"Bearer {key}"} if key else None
        result = client.infer(model, [tensor], headers=headers)
        (output,) = result.get_response()["outputs"]
        return result.as_numpy(output["name"])
    finally:
        client.close()


def rounded(p: np.ndarray) -> str:
    return np.array2string(p, precision=2, suppress_small=True, floatmode="fixed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", help="your OIP V2 server's URL (default: start MLServer)")
    parser.add_argument("--model", default="digits", help="its model's name")
    args = parser.parse_args()
    start = time.perf_counter()
    digits = load_dataset("digits")
    images, labels = digits.train.images.float(), digits.train.labels
    test, test_labels = digits.test.images[:200].numpy(), digits.test.labels[:200].numpy()
    processes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            if args.upstream is None:
                mlserver, upstream = start_mlserver(
                    your_classifier(images, labels), images[:2], work
                )
                processes.append(mlserver)
                print(f"your server: MLServer at {upstream}, model '{args.model}'")
            else:
                upstream = args.upstream.rstrip("/")
                print(f"your server: {upstream}, model '{args.model}'")

            alice_key, alice_digest = new_key()
            bob_key, bob_digest = new_key()
            config = work / "gateway.toml"
            config.write_text(
                GATEWAY.format(
                    url=upstream,
                    model=args.model,
                    epsilon=EPSILON,
                    surrogate=work / "surrogate",
                    database=work / "gateway.sqlite",
                    alice=alice_digest,
                    bob=bob_digest,
                    bob_quota=BOB_QUOTA,
                )
            )
            upstream_config = tomllib.loads(config.read_text())["model"]["upstream"]
            agreement = distil_through(upstream_config, images, work / "surrogate")
            print(
                f"surrogate distilled from its answers on {len(images)} of your images "
                f"(top-1 agreement {agreement:.3f} on held-out ones)"
            )
            gateway_process, gateway = start_gateway(config, work)
            processes.append(gateway_process)
            print(f"gateway at {gateway}: GRAD², epsilon {EPSILON}, top-1 kept")

            undefended = ask(upstream, test, args.model)
            defended = ask(gateway, test, "digits", alice_key)
            distance = np.abs(defended - undefended).sum(axis=1)
            kept = int((defended.argmax(1) == undefended.argmax(1)).sum())
            print("the two answers the defense moves most:")
            for i in np.argsort(-distance)[:2]:
                image = f"test image {i} (a {test_labels[i]}):"
                print(f"{image} undefended {rounded(undefended[i])}")
                print(f"{'':{len(image)}}   defended {rounded(defended[i])}")
            print(
                f"over {len(test)} test images: the defended answer differs on "
                f"{int((distance > 1e-4).sum())} (L1 mean {distance.mean():.3f}, "
                f"max {distance.max():.3f}); top-1 kept on {kept}/{len(test)}; accuracy "
                f"{(undefended.argmax(1) == test_labels).mean():.3f} undefended, "
                f"{(defended.argmax(1) == test_labels).mean():.3f} defended"
            )

            for _ in range(BOB_QUOTA // 2):
                ask(gateway, test[:2], "digits", bob_key)
            try:
                ask(gateway, test[:1], "digits", bob_key)
                print(f"bob's request past his quota of {BOB_QUOTA} images was answered")
            except InferenceServerException as refused:
                print(
                    f"bob (quota {BOB_QUOTA} images): {BOB_QUOTA // 2} requests of 2 answered, "
                    f"the next refused: HTTP {refused.status()} {refused.message()}"
                )
        finally:
            for process in reversed(processes):
                stop(process)
    print(f"servers stopped; done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
