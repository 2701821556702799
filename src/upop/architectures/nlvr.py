"""The BLIP-based NLVR2 model (two images, one statement): built in the NLVR issue."""
