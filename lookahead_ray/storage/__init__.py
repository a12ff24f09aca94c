"""Every location lookahead-ray reads or writes: a local path or a URI that ``pyarrow.fs`` resolves.

``s3://``, ``gs://``, ``abfs://``, ``hdfs://`` (credentials and endpoints from the usual environment, e.g.
``AWS_ENDPOINT_URL``, as Ray Train's own storage does) or a local path; locations are plain strings and keep
their scheme everywhere (results, messages). The guarantees hold on every filesystem:

- **Outputs appear only complete.** A file is written to a staged sibling (local) or to a local temporary file
  uploaded in one piece (object stores: an object appears whole or not at all). A directory is written under a
  unique staging location next to its target, then published: renamed (local), or copied server-side into the
  target with its marker (the report or config file every output of this tool holds) copied last (object
  stores). While an object-store target is being replaced it holds a claim object, and an output is complete
  only when it holds its marker and no claim.
- **Nothing this tool did not write is replaced or deleted:** a target must be empty, hold the marker, or hold
  this tool's claim (a publish that was interrupted).
- **Nodes never read each other's disks:** a remote directory a node needs (a model, the token data) is copied
  once per node into the node-local cache (:func:`cache_root`), keyed by its listing, safe against concurrent
  processes of one node.

``paths`` (locations), ``publish`` (complete outputs), ``locks`` (one run per output) and ``cache`` (the node-local
cache), re-exported here: ``from lookahead_ray import storage; storage.join(...)``. Pure (pyarrow and the standard
library).
"""

from lookahead_ray.storage.cache import COMPLETE, WEIGHT_SUFFIXES, cache_root, local_copy, node_cached  # noqa: F401
from lookahead_ray.storage.locks import LOCK_SUFFIX, held_output, lock_location  # noqa: F401
from lookahead_ray.storage.paths import (  # noqa: F401
    absolute,
    exists,
    glob,
    is_dir,
    is_file,
    is_uri,
    join,
    list_files,
    listing,
    make_dirs,
    name,
    open_input,
    parent,
    read_bytes,
    read_text,
    remove_tree,
    resolve,
    size,
)
from lookahead_ray.storage.publish import (  # noqa: F401
    CLAIM,
    atomic_file,
    check_output_dir,
    is_complete,
    publish_dir,
    staging_location,
    staging_path,
    upload_dir,
    upload_file,
    write_text,
)
