"""Builders of hostile (and normal) ingest inputs in a test's tmp folder.

Each ``build_*`` writes its cases and returns ``{case: Expect}``, so any test can run them
through ingest and prepare and check the outcome per case.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

Pixel = tuple[int, int]
RGB = tuple[int, int, int]


@dataclass
class Expect:
    """What one case must become: quarantined for ``reason``, or a candidate row."""

    reason: str | None = None  # quarantine reason (None: a candidate)
    decode_error: str | None = None  # candidate that does not decode, and why
    mode: str | None = None  # the decoded mode recorded in KEY.json
    pixels: dict[Pixel, RGB] = field(default_factory=dict)  # RGB after normalisation
    ext: str | None = None  # the shard member's image extension
    same_bytes: bool = False  # the shard keeps the original image bytes


# ---------------------------------------------------------------- image bytes


def noise(w: int = 64, h: int = 64, seed: int = 0) -> Image.Image:
    """A deterministic RGB noise image (sharp, high entropy)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def encode(img: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB but holds no pixels (a bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def corrupt(data: bytes) -> bytes:
    """``data`` with its middle bytes flipped (the header survives, the pixels do not)."""
    out = bytearray(data)
    for i in range(60, len(out) - 20):
        out[i] ^= 0x55
    return bytes(out)


def gray16() -> bytes:
    """16-bit grey PNG: left half 128*257 (-> 128), right half 65535 (-> 255)."""
    a = np.full((16, 16), 128 * 257, dtype=np.uint16)
    a[:, 8:] = 65535
    return encode(Image.fromarray(a))


def palette_alpha() -> bytes:
    """A palette PNG whose index 0 (black) is transparent; the right half is red."""
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (8, 0, 16, 16))
    return encode(img, transparency=0)


CAPTION = b"a red circle above a blue square on a grey background"


# ---------------------------------------------------------------- folder


def build_folder(root: Path, outside: Path) -> dict[str, Expect]:
    """Write every folder case under ``root`` (link targets under ``outside``)."""
    root.mkdir(parents=True)
    outside.mkdir(parents=True)
    cases: dict[str, Expect] = {}

    def put(stem: str, image: bytes | None, caption: bytes | None, expect: Expect,
            ext: str = "png") -> None:
        (root / stem).parent.mkdir(parents=True, exist_ok=True)
        if image is not None:
            (root / f"{stem}.{ext}").write_bytes(image)
        if caption is not None:
            (root / f"{stem}.txt").write_bytes(caption)
        cases[stem] = expect

    png = encode(noise())
    put("ok_png", png, CAPTION, Expect(mode="RGB", ext="png", same_bytes=True))
    put("ok_jpg", encode(noise(seed=1), "JPEG"), CAPTION,
        Expect(mode="RGB", ext="jpg", same_bytes=True), ext="jpg")
    put("ok_webp", encode(noise(seed=2), "WEBP", lossless=True), CAPTION,
        Expect(mode="RGB", ext="webp", same_bytes=True), ext="webp")
    put("sub/deeper/ok_nested", encode(noise(seed=3)), CAPTION, Expect(mode="RGB"))
    put("ok_json", encode(noise(seed=4)), None, Expect(mode="RGB"))
    (root / "ok_json.json").write_text(json.dumps({"caption": CAPTION.decode(), "url": "u"}))
    put("ok_json_text", encode(noise(seed=5)), None, Expect(mode="RGB"))
    (root / "ok_json_text.json").write_text(json.dumps({"text": CAPTION.decode()}))

    put("corrupt", corrupt(png), CAPTION, Expect(decode_error="undecodable_image"))
    put("truncated", png[: len(png) // 2], CAPTION, Expect(decode_error="truncated_image"))
    put("zero_byte", b"", CAPTION, Expect(decode_error="empty_file"))
    put("text_as_png", b"this is a text file, not a picture\n", CAPTION,
        Expect(decode_error="not_an_image"))
    put("eps_as_png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n", CAPTION,
        Expect(decode_error="not_an_image"))  # never handed to Ghostscript
    put("bomb", png_header_only(100_000, 100_000), CAPTION,
        Expect(decode_error="decompression_bomb"))
    # Over max_pixels but under PIL's own error limit: PIL only warns, our check refuses it.
    put("bomb_warn", png_header_only(10_000, 10_000), CAPTION,
        Expect(decode_error="decompression_bomb"))

    cmyk = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    put("cmyk", cmyk, CAPTION, Expect(mode="CMYK", ext="png", pixels={(0, 0): (255, 0, 0)}),
        ext="jpg")
    put("gray16", gray16(), CAPTION,
        Expect(mode="I;16", ext="png", pixels={(0, 0): (128,) * 3, (15, 0): (255,) * 3}))
    put("palette_alpha", palette_alpha(), CAPTION,
        Expect(mode="P", ext="png", pixels={(0, 0): (255,) * 3, (15, 15): (255, 0, 0)}))
    put("la", encode(Image.new("LA", (8, 8), (0, 0))), CAPTION,
        Expect(mode="LA", ext="png", pixels={(0, 0): (255,) * 3}))
    put("rgba_half", encode(Image.new("RGBA", (8, 8), (255, 0, 0, 128))), CAPTION,
        Expect(mode="RGBA", ext="png", pixels={(0, 0): (255, 127, 127)}))
    keyed = encode(Image.new("RGB", (8, 8), (0, 255, 0)), transparency=(0, 255, 0))
    put("rgb_colour_key", keyed, CAPTION,  # an RGB PNG whose tRNS makes green transparent
        Expect(mode="RGB", ext="png", pixels={(0, 0): (255,) * 3}))
    put("grey_l", encode(Image.new("L", (8, 8), 100)), CAPTION,
        Expect(mode="L", ext="png", pixels={(0, 0): (100,) * 3}))

    put("tiny", encode(noise(1, 1)), CAPTION, Expect(mode="RGB"))
    put("wide", encode(noise(1000, 10)), CAPTION, Expect(mode="RGB"))
    put("tall", encode(noise(10, 1000)), CAPTION, Expect(mode="RGB"))

    put("caption_empty", encode(noise(seed=6)), b"", Expect(mode="RGB"))
    put("caption_space", encode(noise(seed=7)), b" \t\n  \r\n", Expect(mode="RGB"))
    put("caption_not_utf8", encode(noise(seed=8)), b"caf\xe9 au lait \xff\xfe",
        Expect(reason="caption_not_utf8"))
    put("caption_nul", encode(noise(seed=9)), b"a cat\x00 on a mat",
        Expect(reason="caption_nul_bytes"))
    put("caption_10k", encode(noise(seed=10)), b" ".join([b"word"] * 10_000), Expect(mode="RGB"))
    put("bad_json", encode(noise(seed=11)), None, Expect(reason="bad_json"))
    (root / "bad_json.json").write_bytes(b'{"caption": "unterminated')
    put("no_caption", encode(noise(seed=12)), None, Expect(reason="missing_caption"))
    put("no_image", None, CAPTION, Expect(reason="missing_image"))

    dup = encode(noise(seed=13))
    put("dup_a", dup, CAPTION, Expect(mode="RGB", same_bytes=True))
    put("dup_b", dup, CAPTION + b" again", Expect(mode="RGB", same_bytes=True))

    (outside / "secret.png").write_bytes(SECRET)
    (outside / "secret.txt").write_bytes(SECRET)
    (outside / "dir").mkdir()
    (outside / "dir" / "inner.png").write_bytes(SECRET)
    (outside / "dir" / "inner.txt").write_bytes(SECRET)
    os.symlink(outside / "secret.png", root / "link_out.png")
    (root / "link_out.txt").write_bytes(CAPTION)
    cases["link_out"] = Expect(reason="symlink")
    os.symlink(root / "ok_png.png", root / "link_in.png")  # inside, still not followed
    cases["link_in"] = Expect(reason="symlink")
    os.symlink(outside / "dir", root / "link_dir")
    cases["link_dir"] = Expect(reason="symlink")
    os.symlink(root / "nowhere.png", root / "link_broken.png")
    cases["link_broken"] = Expect(reason="symlink")
    (root / "link_caption.png").write_bytes(encode(noise(seed=14)))
    os.symlink(outside / "secret.txt", root / "link_caption.txt")
    cases["link_caption"] = Expect(reason="symlink")
    if hasattr(os, "mkfifo"):  # reading a FIFO would block forever
        os.mkfifo(root / "fifo.png")
        (root / "fifo.txt").write_bytes(CAPTION)
        cases["fifo"] = Expect(reason="special_file")
    with open(os.fsencode(root) + b"/bad_name_\xff.png", "wb") as fh:  # not a UTF-8 name
        fh.write(encode(noise(seed=15)))
    cases["bad_name_\\xff"] = Expect(reason="missing_caption")  # shown with the byte escaped
    (root / "notes.md").write_text("not a sample: skipped")
    return cases


SECRET = b"SECRET-BYTES-OUTSIDE-THE-INPUT " * 4


# ---------------------------------------------------------------- tar


def tar_bytes(members: list[tuple[str, bytes | None, str]]) -> bytes:
    """A tar of ``(name, data, linkname)``; data None with a linkname makes a symlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def wds_members(n: int, seed: int = 0) -> list[tuple[str, bytes | None, str]]:
    """``n`` well-formed samples: KEY.png, KEY.txt, KEY.json (meta), KEY.cls (skipped)."""
    out: list[tuple[str, bytes | None, str]] = []
    for i in range(n):
        key = f"s{i:04d}"
        out += [(f"{key}.cls", b"3", ""), (f"{key}.json", json.dumps({"i": i}).encode(), ""),
                (f"{key}.png", encode(noise(seed=seed + i)), ""),
                (f"{key}.txt", CAPTION + f" number {i}".encode(), "")]
    return out


def build_tars(root: Path) -> dict[str, dict[str, Expect]]:
    """Write ``normal.tar``, ``unsafe.tar`` and two truncated tars; ``{tar: {name: Expect}}``.

    Cases are named by WebDataset key; "@tail" is the truncated tar's last item.
    """
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, Expect]] = {}
    (root / "normal.tar").write_bytes(tar_bytes(wds_members(3)))
    out["normal.tar"] = {f"s{i:04d}": Expect(mode="RGB", ext="png", same_bytes=True)
                         for i in range(3)}

    escape = root / "escaped"  # where an extracting reader would write the absolute member
    unsafe = [("../escape.png", encode(noise()), ""), ("../escape.txt", CAPTION, ""),
              (f"{escape}/abs.png", encode(noise()), ""), (f"{escape}/abs.txt", CAPTION, ""),
              ("lnk.png", None, "/etc/passwd"), ("lnk.txt", CAPTION, ""),
              ("fine.png", encode(noise(seed=5)), ""), ("fine.txt", CAPTION, "")]
    (root / "unsafe.tar").write_bytes(tar_bytes(unsafe))
    out["unsafe.tar"] = {"../escape": Expect(reason="unsafe_tar_path"),
                         f"{escape}/abs": Expect(reason="unsafe_tar_path"),
                         "lnk": Expect(reason="symlink"), "fine": Expect(mode="RGB")}

    # Cut inside the 4th sample's image: 3 complete samples, then the tail.
    members = wds_members(6)
    full = tar_bytes(members)
    cut = full.index(encode(noise(seed=3))) + 100
    (root / "cut_data.tar").write_bytes(full[:cut])
    out["cut_data.tar"] = {f"s{i:04d}": Expect(mode="RGB") for i in range(3)}
    out["cut_data.tar"]["@tail"] = Expect(reason="truncated_tar")
    # Cut right after the 2nd sample's last member (no end-of-archive blocks): the 2nd sample
    # cannot be known complete, so it goes with the tail.
    two = tar_bytes(members[:8])
    (root / "cut_header.tar").write_bytes(two[: len(two) - _end_blocks(two)])
    out["cut_header.tar"] = {"s0000": Expect(mode="RGB"), "@tail": Expect(reason="truncated_tar")}
    return out


def _end_blocks(data: bytes) -> int:
    """Bytes of zero blocks (end-of-archive plus record padding) at the end of a tar."""
    stripped = len(data.rstrip(b"\0"))
    return len(data) - (stripped + (-stripped) % tarfile.BLOCKSIZE)


# ---------------------------------------------------------------- parquet


def build_parquet(root: Path) -> dict[str, dict[int, Expect]]:
    """Write an HF-style (struct image, ``text``) and a plain (``jpg``, ``caption``) Parquet."""
    root.mkdir(parents=True, exist_ok=True)
    images = [{"bytes": encode(noise(seed=i)), "path": None} for i in range(4)]
    images[2] = {"bytes": None, "path": "/somewhere/else.png"}
    images[3] = None
    texts = [CAPTION.decode(), None, CAPTION.decode(), CAPTION.decode()]
    table = pa.table({"image": pa.array(images, pa.struct([("bytes", pa.binary()),
                                                             ("path", pa.string())])),
                      "text": pa.array(texts, pa.string())})
    pq.write_table(table, root / "hf.parquet", row_group_size=2)
    plain = pa.table({"jpg": pa.array([encode(noise(seed=9), "JPEG"), encode(noise(seed=8))]),
                      "caption": pa.array([CAPTION, b"bad \xff utf8"], pa.binary())})
    pq.write_table(plain, root / "plain.parquet")
    return {"hf.parquet": {0: Expect(mode="RGB"), 1: Expect(reason="missing_caption"),
                           2: Expect(reason="missing_image"), 3: Expect(reason="missing_image")},
            "plain.parquet": {0: Expect(mode="RGB", ext="jpg", same_bytes=True),
                              1: Expect(reason="caption_not_utf8")}}


# ---------------------------------------------------------------- checks


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int, str]]:
    """``{relpath: (mode, size, sha1)}`` of everything under ``root`` (links not followed)."""
    out: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip is not None:
            dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            digest = ""
            if path.is_file() and not path.is_symlink():
                digest = hashlib.sha1(path.read_bytes()).hexdigest()
            out[str(path.relative_to(root))] = (st.st_mode, st.st_size, digest)
    return out
