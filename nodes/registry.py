"""The list of node classes the pack registers (one import per node module)."""

from __future__ import annotations


def node_classes() -> list[type]:
    from .bake_node import NVFP4BakeInputScales
    from .calibrate_node import NVFP4Calibrate
    from .emulate_node import NVFP4EmulateW4A4
    from .inspect_node import NVFP4InspectLayers
    from .loader import NVFP4LoadModel
    from .plan_node import NVFP4BuildPlan
    from .probe_node import NVFP4CompareOutputs, NVFP4SensitivityProbe
    from .report_node import NVFP4CalibrationReport
    from .save_node import NVFP4SaveCheckpoint

    return [
        NVFP4LoadModel,
        NVFP4InspectLayers,
        NVFP4BuildPlan,
        NVFP4SaveCheckpoint,
        NVFP4Calibrate,
        NVFP4CalibrationReport,
        NVFP4EmulateW4A4,
        NVFP4BakeInputScales,
        NVFP4SensitivityProbe,
        NVFP4CompareOutputs,
    ]
