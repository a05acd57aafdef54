"""Rebuild datasets/example-photos/ from NASA's public-domain astronaut portrait (bundled in scikit-image).

A phone camera roll in miniature: different sizes and framings, a JPEG whose pixels are stored
sideways with an EXIF orientation tag, a PNG with an alpha channel, non-square photos.
Run: .venv/bin/python tools/make_example_photos.py
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter
from skimage import data

OUT = Path(__file__).resolve().parent.parent / "datasets" / "example-photos"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    src = Image.fromarray(data.astronaut())  # 512x512 RGB; face near (177, 66, 95, 95)

    # 1. the portrait as it is
    src.save(OUT / "IMG_0001.jpg", quality=92)

    # 2. closer framing, portrait orientation, upscaled as a phone crop would be
    src.crop((110, 10, 350, 330)).resize((600, 800), Image.LANCZOS).save(OUT / "IMG_0002.jpg", quality=90)

    # 3. landscape framing stored sideways: the pixels are rotated, EXIF orientation 6 says
    #    "rotate 90 degrees clockwise to display", as phones write it
    wide = src.crop((40, 0, 512, 360))
    exif = Image.Exif()
    exif[0x0112] = 6
    wide.transpose(Image.Transpose.ROTATE_90).save(OUT / "IMG_0003.jpg", quality=90, exif=exif)

    # 4. a PNG with transparency: mirrored, the background faded out towards the edges
    mirrored = src.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((448, 448), Image.LANCZOS)
    yy, xx = np.mgrid[0:448, 0:448]
    dist = np.hypot((xx - 224) / 224, (yy - 190) / 260)
    alpha = np.clip((1.25 - dist) * 400, 0, 255).astype(np.uint8)
    rgba = mirrored.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(OUT / "IMG_0004.png")

    # 5. warmer light, slightly tilted, larger
    warm = ImageEnhance.Color(src).enhance(1.4)
    r, g, b = warm.split()
    warm = Image.merge("RGB", (r.point(lambda v: min(255, int(v * 1.08))), g, b.point(lambda v: int(v * 0.9))))
    warm.rotate(6, resample=Image.BICUBIC, expand=False).crop((30, 30, 482, 482)).resize(
        (720, 720), Image.LANCZOS).save(OUT / "IMG_0005.jpg", quality=88)

    # 6. a wide 4:3 shot: the portrait on a soft, blurred extension of itself
    canvas = src.resize((1024, 768), Image.BILINEAR).filter(ImageFilter.GaussianBlur(24))
    canvas.paste(src.crop((60, 0, 460, 512)).resize((600, 768), Image.LANCZOS), (300, 0))
    canvas.save(OUT / "IMG_0006.jpg", quality=90)


if __name__ == "__main__":
    main()
