"""Push a tiny demo image (one file holding CONTENT) to IMAGE; print its digest.

Usage: push_demo_image.py IMAGE CONTENT [--index]
"""

from __future__ import annotations

import argparse
import asyncio

from signgate.reference import ImageReference
from signgate.registry import RegistryClient, RegistryOptions
from signgate.registry.images import push_image, push_index


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("image")
    parser.add_argument("content")
    parser.add_argument("--index", action="store_true", help="a linux/amd64+arm64 index")
    args = parser.parse_args()
    reference = ImageReference.parse(args.image)
    async with RegistryClient(RegistryOptions()) as client:
        if args.index:
            digest, _ = await push_index(
                client, reference.repository, reference.tag, content=args.content.encode(),
                platforms=[("linux", "amd64"), ("linux", "arm64")],
            )
        else:
            digest = await push_image(
                client, reference.repository, reference.tag, content=args.content.encode()
            )
    print(digest)


if __name__ == "__main__":
    asyncio.run(main())
