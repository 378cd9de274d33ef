"""A small, learnable image-text data set: coloured shapes on backgrounds, with captions and class labels.

Every image shows one shape of one colour on a background; its caption names all three, and its class label is
the (colour, shape) pair, so text-to-image, image-to-image (same class), composed (image + "make it blue") and
text-to-text (paraphrase) retrieval are all learnable in a few hundred steps by a tiny model.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SIZES = ("small", "large")
MODES = ("t2i", "i2i", "i2t", "t2t", "m2i", "m2t")


@dataclass(frozen=True)
class ShapeSpec:
    """What one synthetic image shows."""

    colour: str
    shape: str
    background: str
    size: str

    @property
    def label(self) -> int:
        return list(COLOURS).index(self.colour) * len(SHAPES) + SHAPES.index(self.shape)

    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} on a {self.background} background"

    def paraphrase(self) -> str:
        return f"picture of a {self.colour} {self.shape}, {self.size}, {self.background} backdrop"


def caption_corpus() -> Iterator[str]:
    """Every word the captions use, in sentences (the tiny tokenizers are trained on this)."""
    for colour in COLOURS:
        for shape in SHAPES:
            for background in BACKGROUNDS:
                for size in SIZES:
                    spec = ShapeSpec(colour, shape, background, size)
                    yield spec.caption()
                    yield spec.paraphrase()
                    yield f"the same shape in {colour}"
    yield "a photo of a cat sitting on a chair. a dog, a bird! 0123456789"


def draw_shape(spec: ShapeSpec, image_size: int, rng: random.Random) -> Image.Image:
    """Render ``spec`` at a random position (size, position jitter keep images of one class distinct)."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(img)
    frac = rng.uniform(0.25, 0.35) if spec.size == "small" else rng.uniform(0.5, 0.7)
    side = max(4, int(image_size * frac))
    x0 = rng.randint(0, image_size - side)
    y0 = rng.randint(0, image_size - side)
    box = (x0, y0, x0 + side, y0 + side)
    fill = COLOURS[spec.colour]
    if spec.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif spec.shape == "square":
        draw.rectangle(box, fill=fill)
    elif spec.shape == "triangle":
        draw.polygon([(x0 + side // 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    else:
        bar = max(2, side // 3)
        draw.rectangle((x0 + (side - bar) // 2, y0, x0 + (side + bar) // 2, y0 + side), fill=fill)
        draw.rectangle((x0, y0 + (side - bar) // 2, x0 + side, y0 + (side + bar) // 2), fill=fill)
    return img


def _random_spec(rng: random.Random, colour: str | None = None, shape: str | None = None) -> ShapeSpec:
    return ShapeSpec(
        colour or rng.choice(list(COLOURS)),
        shape or rng.choice(SHAPES),
        rng.choice(list(BACKGROUNDS)),
        rng.choice(SIZES),
    )


def _record(mode: str, idx: int, rng: random.Random, new_image, num_negatives: int) -> dict[str, Any]:
    """One record of the schema (query, query_image, positive, negatives, label) for ``mode``."""
    spec = _random_spec(rng)
    other = [_random_spec(rng) for _ in range(num_negatives)]
    other = [o if o.label != spec.label else _random_spec(rng, shape=_other(SHAPES, spec.shape, rng)) for o in other]
    rec: dict[str, Any] = {"id": f"{mode}-{idx:06d}", "label": spec.label}
    if mode == "t2i":
        rec.update(query=spec.caption(), positive=new_image(spec), negatives=[new_image(o) for o in other])
    elif mode == "i2t":
        rec.update(query=new_image(spec), positive=spec.caption(), negatives=[o.caption() for o in other])
    elif mode == "i2i":
        twin = _random_spec(rng, colour=spec.colour, shape=spec.shape)
        rec.update(query=new_image(spec), positive=new_image(twin), negatives=[new_image(o) for o in other])
    elif mode == "t2t":
        rec.update(query=spec.caption(), positive=spec.paraphrase(), negatives=[o.paraphrase() for o in other])
    elif mode in ("m2i", "m2t"):
        target_colour = _other(list(COLOURS), spec.colour, rng)
        target = _random_spec(rng, colour=target_colour, shape=spec.shape)
        rec.update(query=f"the same shape in {target_colour}", query_image=new_image(spec), label=target.label)
        if mode == "m2i":
            rec.update(positive=new_image(target), negatives=[new_image(o) for o in other])
        else:
            rec.update(positive=target.caption(), negatives=[o.caption() for o in other])
    else:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if not num_negatives:
        rec.pop("negatives")
    return rec


def _other(options, current, rng: random.Random):
    return rng.choice([o for o in options if o != current])


def make_shapes_dataset(
    out_dir: str | Path,
    num_train: int = 128,
    num_val: int = 32,
    num_test: int = 32,
    mode: str = "t2i",
    image_size: int = 32,
    num_negatives: int = 0,
    formats: tuple[str, ...] = ("jsonl",),
    seed: int = 0,
) -> dict[str, Path]:
    """Write JPEGs under ``out_dir/images`` and records for ``train``/``val``/``test`` splits.

    Image paths in the records are relative to ``out_dir`` (use ``image_root=out_dir``... or the absolute paths the
    records hold: they are written absolute so the files work from any directory). Returns
    ``{"train": path, "val": path, "test": path, "images": dir}`` for the first format, plus
    ``"{split}.{fmt}"`` keys for every format written.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    counter = iter(range(10**9))

    def new_image(spec: ShapeSpec) -> str:
        path = out / "images" / f"{next(counter):06d}_{spec.colour}_{spec.shape}.jpg"
        draw_shape(spec, image_size, rng).save(path, format="JPEG", quality=90)
        return str(path.resolve())

    result: dict[str, Path] = {"images": out / "images"}
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        records = [_record(mode, i, rng, new_image, num_negatives) for i in range(count)]
        for fmt in formats:
            path = out / f"{split}.{fmt}"
            _write_records(records, path, fmt)
            result[f"{split}.{fmt}"] = path
            result.setdefault(split, path)
    return result


def _write_records(records: list[dict[str, Any]], path: Path, fmt: str) -> None:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "csv":
        keys = sorted({k for r in records for k in r})
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            for r in records:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        raise ValueError(f"unknown record format {fmt!r}; expected jsonl, csv or parquet")
