from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class local_image_entry(_message.Message):
    __slots__ = ("name", "snapshot_id", "open_mode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    OPEN_MODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    snapshot_id: str
    open_mode: int
    def __init__(self, name: _Optional[str] = ..., snapshot_id: _Optional[str] = ..., open_mode: _Optional[int] = ...) -> None: ...

class remote_image_entry(_message.Message):
    __slots__ = ("name", "snapshot_id", "open_mode", "size", "sha256", "link_version", "chunked", "session", "marker", "sequence", "compression", "offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    OPEN_MODE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    LINK_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNKED_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    MARKER_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    snapshot_id: str
    open_mode: int
    size: int
    sha256: bytes
    link_version: int
    chunked: bool
    session: str
    marker: int
    sequence: int
    compression: int
    offset: int
    def __init__(self, name: _Optional[str] = ..., snapshot_id: _Optional[str] = ..., open_mode: _Optional[int] = ..., size: _Optional[int] = ..., sha256: _Optional[bytes] = ..., link_version: _Optional[int] = ..., chunked: _Optional[bool] = ..., session: _Optional[str] = ..., marker: _Optional[int] = ..., sequence: _Optional[int] = ..., compression: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class local_image_reply_entry(_message.Message):
    __slots__ = ("error",)
    ERROR_FIELD_NUMBER: _ClassVar[int]
    error: int
    def __init__(self, error: _Optional[int] = ...) -> None: ...

class snapshot_id_entry(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class img_streamer_request_entry(_message.Message):
    __slots__ = ("filename",)
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    filename: str
    def __init__(self, filename: _Optional[str] = ...) -> None: ...

class img_streamer_reply_entry(_message.Message):
    __slots__ = ("exists",)
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    exists: bool
    def __init__(self, exists: _Optional[bool] = ...) -> None: ...

class link_status_entry(_message.Message):
    __slots__ = ("kind", "version", "images", "bytes", "sequence", "name", "snapshot_id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    kind: int
    version: int
    images: int
    bytes: int
    sequence: int
    name: str
    snapshot_id: str
    def __init__(self, kind: _Optional[int] = ..., version: _Optional[int] = ..., images: _Optional[int] = ..., bytes: _Optional[int] = ..., sequence: _Optional[int] = ..., name: _Optional[str] = ..., snapshot_id: _Optional[str] = ...) -> None: ...
