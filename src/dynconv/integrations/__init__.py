"""Integrations with detection frameworks: :mod:`dynconv.integrations.ultralytics` (YOLOv8,
YOLO11 and the rest of the ``ultralytics`` package) and :mod:`dynconv.integrations.yolov5`."""
