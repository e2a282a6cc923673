"""`prism demo`: build the tiny models if missing, bring the system up, send real requests
(text-only, one image, two images, audio) through the SDK and print outputs with timings."""
from __future__ import annotations

import io
import math
import time
import wave
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from prism.client import PrismClient
from prism.launch import Deployment, DeploymentOptions


@dataclass(frozen=True)
class DemoRequest:
    title: str
    text: str
    images: tuple = ()
    audios: tuple = ()


def _picture(seed: int, size: int = 96):
    """A small synthetic picture (stripes and a disc) as a PIL image."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size]
    r = ((xx * (3 + seed)) % 64) * 4
    g = ((yy * (5 + seed)) % 64) * 4
    b = (((xx - size / 2) ** 2 + (yy - size / 2) ** 2) < (size / (3 + seed % 2)) ** 2) * 255
    return Image.fromarray(np.stack([r, g, b], -1).astype("uint8"))


def _tone(seconds: float = 1.5, freq: float = 440.0, rate: int = 16000) -> bytes:
    """A WAV file of a sine tone."""
    samples = [int(12000 * math.sin(2 * math.pi * freq * i / rate)) for i in range(int(seconds * rate))]
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(s.to_bytes(2, "little", signed=True) for s in samples))
    return buf.getvalue()


def _send(console: Console, client: PrismClient, req: DemoRequest, max_new_tokens: int) -> list:
    content = [{"type": "image", "image": im} for im in req.images]
    content += [{"type": "audio", "audio": au} for au in req.audios]
    content.append({"type": "text", "text": req.text})
    started = time.perf_counter()
    text, last, count = [], None, 0
    for chunk in client.generate(messages=[{"role": "user", "content": content}], max_new_tokens=max_new_tokens):
        text.append(chunk.text)
        count += len(chunk.token_ids)
        last = chunk
    wall = (time.perf_counter() - started) * 1000
    u, t = last.usage, last.timing
    return [req.title, "".join(text).strip()[:60] or "(special tokens only)", str(count),
            f"{u.prompt_tokens} ({u.image_tokens} img, {u.audio_tokens} audio)",
            f"{t.ttft_ms:.0f}", f"{t.tpot_ms:.1f}", f"{wall:.0f}"]


def run_demo(models_dir: Path, max_new_tokens: int = 24, threads: int = 1) -> None:
    from prism.models.builder import make_model

    console = Console()
    plans = [
        ("llava", [DemoRequest("text only", "Write one sentence about the sea."),
                   DemoRequest("one image", "What is in this picture?", images=(_picture(1),)),
                   DemoRequest("two images", "Compare the two pictures.", images=(_picture(1), _picture(2)))]),
        ("qwen2-audio", [DemoRequest("audio", "What do you hear?", audios=(_tone(),))]),
    ]
    for family, requests in plans:
        model_dir = models_dir / f"{family}-tiny"
        if not (model_dir / "config.json").is_file():
            with console.status(f"building the tiny {family} model in {model_dir}"):
                make_model(family, "tiny", model_dir)
        with console.status(f"starting encoder, prefill, decode and scheduler for {family}"):
            started = time.perf_counter()
            deployment = Deployment(DeploymentOptions(model_dir=model_dir, threads=threads, slots=8, max_len=1024)).start()
        try:
            console.print(f"[bold]{family}[/]: up in {time.perf_counter() - started:.1f}s — "
                          + ", ".join(f"{k} {v}" for k, v in deployment.endpoints().items()))
            table = Table("request", "output (random weights: noise)", "tokens", "prompt tokens", "TTFT ms",
                          "ms/token", "total ms")
            with PrismClient(deployment.address) as client:
                for req in requests:
                    table.add_row(*_send(console, client, req, max_new_tokens))
            console.print(table)
        finally:
            deployment.stop()
