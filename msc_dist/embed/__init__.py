"""Embed the normal set with a checkpoint (Ray Data), write Parquet, build the FAISS index."""
