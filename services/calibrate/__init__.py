"""KVQuant offline calibration (`kvpack calibrate`)."""
