"""Where difflab's datasets live on disk or in object storage: manifests, locations, litdata shards, progress."""
