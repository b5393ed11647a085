"""Download stage: fetch the four MNIST files and verify them.

Reads:  torchvision's official MNIST mirrors, or only $MNIST_MIRROR when it is set
        (a local folder or a URL prefix holding the four .gz files).
Writes: OUT_DIR/<name>, the decompressed IDX files, each checked against its md5.
Params: none; where the data comes from is not a hyperparameter.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import os
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from torchvision.datasets import MNIST
from tqdm import tqdm

from stages.common import StageError, atomic_dir, run_cli

# md5 of each decompressed file. The .gz containers differ between mirrors,
# the decompressed bytes do not.
FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MIRROR_ENV = "MNIST_MIRROR"
FIX = f"set {MIRROR_ENV} to a folder or URL prefix holding the four MNIST .gz files"
TIMEOUT_S = 30
CHUNK = 1 << 20


def sources_from_env(environ=os.environ) -> list[str]:
    """The mirrors to try, in order: $MNIST_MIRROR alone, or torchvision's list."""
    mirror = environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return list(MNIST.mirrors)
    if "://" not in mirror and not Path(mirror).is_dir():
        raise StageError(f"{MIRROR_ENV}={mirror} is not a folder or a URL; {FIX}")
    return [mirror]


def _copy_with_bar(src, dest: Path, total: int | None, label: str) -> None:
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
              leave=False) as bar, dest.open("wb") as out:
        while chunk := src.read(CHUNK):
            out.write(chunk)
            bar.update(len(chunk))


def fetch(source: str, name: str, dest: Path) -> None:
    """Copy SOURCE/NAME (a local path or URL) to DEST, with a progress bar.

    Raises FileNotFoundError when the source lacks the file, OSError otherwise.
    """
    if "://" in source:
        url = source.rstrip("/") + "/" + name
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
                length = resp.headers.get("Content-Length")
                _copy_with_bar(resp, dest, int(length) if length else None, name)
        except urllib.error.HTTPError as err:
            if err.code == 404:
                raise FileNotFoundError(f"{url} does not exist (HTTP 404)") from None
            raise OSError(f"{url}: HTTP {err.code}") from None
        except urllib.error.URLError as err:
            raise OSError(f"{url}: {err.reason}") from None
        except (http.client.HTTPException, ValueError) as err:
            raise OSError(f"{url}: {type(err).__name__} {err}".rstrip()) from None
        return
    path = Path(source) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with path.open("rb") as src:
        _copy_with_bar(src, dest, path.stat().st_size, name)


def gunzip_md5(src: Path, dest: Path) -> str:
    """Decompress SRC into DEST and return the md5 of the decompressed bytes."""
    digest = hashlib.md5()
    with gzip.open(src, "rb") as zin, dest.open("wb") as out:
        while chunk := zin.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def fetch_verified(sources: list[str], name: str, expected_md5: str, dest: Path) -> None:
    """Fetch NAME.gz from the first source that has a good copy; write it decompressed."""
    gz = dest.with_name(dest.name + ".gz")
    problems = []
    for source in sources:
        try:
            fetch(source, gz.name, gz)
            md5 = gunzip_md5(gz, dest)
        except FileNotFoundError as err:
            problems.append(str(err))
            continue
        except (EOFError, zlib.error, gzip.BadGzipFile) as err:
            problems.append(f"{source}: truncated or corrupt gzip ({err})")
            continue
        except OSError as err:
            problems.append(str(err))
            continue
        finally:
            gz.unlink(missing_ok=True)
        if md5 == expected_md5:
            return
        problems.append(f"{source}: md5 of the decompressed file is {md5}, expected "
                        f"{expected_md5}, so it is corrupt or not the original")
    dest.unlink(missing_ok=True)
    raise StageError(f"{gz.name}: {'; '.join(problems)}; {FIX}")


def download(out_dir: str | Path, sources: list[str]) -> None:
    """Write the four decompressed, verified MNIST files to OUT_DIR, all or none."""
    with atomic_dir(out_dir) as staging:
        for name, md5 in FILES.items():
            fetch_verified(sources, name, md5, staging / name)
            print(f"{name}: md5 {md5} ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    download(args.out_dir, sources_from_env())


if __name__ == "__main__":
    run_cli(main)
