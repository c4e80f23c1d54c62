"""The on-disk feature store: schema, writer, reader, verify."""

from kvpipe.store.manifest import ImageRow
from kvpipe.store.reader import Annotation, Features, FeatureStore, read_meta
from kvpipe.store.schema import ALL_KINDS, KINDS, POST_PROJ, SCHEMA_VERSION, FeatureSetMeta

__all__ = ["ALL_KINDS", "KINDS", "POST_PROJ", "SCHEMA_VERSION", "Annotation", "FeatureSetMeta",
           "FeatureStore", "Features", "ImageRow", "read_meta"]
