"""From checkpoint to engines: export (+ parity), precision (fp16, int8, calibration, gate), build orchestration,
and the formats table with its manifests. Importing this package imports neither torch nor any backend library."""
