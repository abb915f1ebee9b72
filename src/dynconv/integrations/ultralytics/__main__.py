"""The ``yolo`` command with dynconv's blocks registered (docs/yolo.md, "Ultralytics")::

    python -m dynconv.integrations.ultralytics train model=yolo11n-odconv.yaml data=data.yaml
    python -m dynconv.integrations.ultralytics val model=runs/detect/train/weights/best.pt

Every argument goes to Ultralytics' own command line (``yolo MODE key=value ...``) unchanged;
the import registers the blocks, and shipped YAML names resolve from any directory.
"""

from __future__ import annotations

from . import register


def main() -> None:
    register()
    from ultralytics.cfg import entrypoint  # reads sys.argv[1:] like the ``yolo`` command

    entrypoint()


if __name__ == "__main__":
    main()
