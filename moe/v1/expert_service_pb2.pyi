from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("layer", "hidden_states", "token_ids", "return_routing", "request_id")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RETURN_ROUTING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    layer: int
    hidden_states: Tensor
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    return_routing: bool
    request_id: str
    def __init__(self, layer: _Optional[int] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ..., return_routing: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class Routing(_message.Message):
    __slots__ = ("token_index", "expert", "weight")
    TOKEN_INDEX_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    token_index: _containers.RepeatedScalarFieldContainer[int]
    expert: _containers.RepeatedScalarFieldContainer[int]
    weight: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_index: _Optional[_Iterable[int]] = ..., expert: _Optional[_Iterable[int]] = ..., weight: _Optional[_Iterable[float]] = ...) -> None: ...

class RoutingStats(_message.Message):
    __slots__ = ("tokens_per_expert", "utilisation_entropy", "load_balancing_loss", "z_loss", "max_over_mean_load")
    TOKENS_PER_EXPERT_FIELD_NUMBER: _ClassVar[int]
    UTILISATION_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    LOAD_BALANCING_LOSS_FIELD_NUMBER: _ClassVar[int]
    Z_LOSS_FIELD_NUMBER: _ClassVar[int]
    MAX_OVER_MEAN_LOAD_FIELD_NUMBER: _ClassVar[int]
    tokens_per_expert: _containers.RepeatedScalarFieldContainer[int]
    utilisation_entropy: float
    load_balancing_loss: float
    z_loss: float
    max_over_mean_load: float
    def __init__(self, tokens_per_expert: _Optional[_Iterable[int]] = ..., utilisation_entropy: _Optional[float] = ..., load_balancing_loss: _Optional[float] = ..., z_loss: _Optional[float] = ..., max_over_mean_load: _Optional[float] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden_states", "routing", "dropped_tokens", "rerouted_tokens", "degraded_tokens", "routing_table_version", "transport", "stats")
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REROUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_TABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    hidden_states: Tensor
    routing: Routing
    dropped_tokens: int
    rerouted_tokens: int
    degraded_tokens: _containers.RepeatedScalarFieldContainer[int]
    routing_table_version: int
    transport: str
    stats: RoutingStats
    def __init__(self, hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., routing: _Optional[_Union[Routing, _Mapping]] = ..., dropped_tokens: _Optional[int] = ..., rerouted_tokens: _Optional[int] = ..., degraded_tokens: _Optional[_Iterable[int]] = ..., routing_table_version: _Optional[int] = ..., transport: _Optional[str] = ..., stats: _Optional[_Union[RoutingStats, _Mapping]] = ...) -> None: ...

class ForwardStreamResponse(_message.Message):
    __slots__ = ("sequence", "request_id", "code", "message", "response")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    request_id: str
    code: int
    message: str
    response: ForwardResponse
    def __init__(self, sequence: _Optional[int] = ..., request_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., response: _Optional[_Union[ForwardResponse, _Mapping]] = ...) -> None: ...

class ExpertStatus(_message.Message):
    __slots__ = ("layer", "expert", "replicas", "tokens_per_s", "groups")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    replicas: int
    tokens_per_s: float
    groups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., replicas: _Optional[int] = ..., tokens_per_s: _Optional[float] = ..., groups: _Optional[_Iterable[str]] = ...) -> None: ...

class GroupStatus(_message.Message):
    __slots__ = ("name", "node_id", "alive", "device", "slots", "scaled", "tokens_per_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    SCALED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    node_id: str
    alive: bool
    device: str
    slots: int
    scaled: bool
    tokens_per_s: float
    def __init__(self, name: _Optional[str] = ..., node_id: _Optional[str] = ..., alive: _Optional[bool] = ..., device: _Optional[str] = ..., slots: _Optional[int] = ..., scaled: _Optional[bool] = ..., tokens_per_s: _Optional[float] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RouterStatus(_message.Message):
    __slots__ = ("name", "address", "transports", "requests", "batches", "rdt")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    RDT_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    transports: _containers.RepeatedScalarFieldContainer[str]
    requests: int
    batches: int
    rdt: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., transports: _Optional[_Iterable[str]] = ..., requests: _Optional[int] = ..., batches: _Optional[int] = ..., rdt: _Optional[str] = ...) -> None: ...

class ControlEvent(_message.Message):
    __slots__ = ("kind", "at_unix", "version", "detail", "recovery_s")
    KIND_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_S_FIELD_NUMBER: _ClassVar[int]
    kind: str
    at_unix: float
    version: int
    detail: str
    recovery_s: float
    def __init__(self, kind: _Optional[str] = ..., at_unix: _Optional[float] = ..., version: _Optional[int] = ..., detail: _Optional[str] = ..., recovery_s: _Optional[float] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("model", "experts", "groups", "routing_table_version", "routers", "events", "supervisor_alive", "supervisor_restarts")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_TABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUTERS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    SUPERVISOR_ALIVE_FIELD_NUMBER: _ClassVar[int]
    SUPERVISOR_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    experts: _containers.RepeatedCompositeFieldContainer[ExpertStatus]
    groups: _containers.RepeatedCompositeFieldContainer[GroupStatus]
    routing_table_version: int
    routers: _containers.RepeatedCompositeFieldContainer[RouterStatus]
    events: _containers.RepeatedCompositeFieldContainer[ControlEvent]
    supervisor_alive: bool
    supervisor_restarts: int
    def __init__(self, model: _Optional[str] = ..., experts: _Optional[_Iterable[_Union[ExpertStatus, _Mapping]]] = ..., groups: _Optional[_Iterable[_Union[GroupStatus, _Mapping]]] = ..., routing_table_version: _Optional[int] = ..., routers: _Optional[_Iterable[_Union[RouterStatus, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[ControlEvent, _Mapping]]] = ..., supervisor_alive: _Optional[bool] = ..., supervisor_restarts: _Optional[int] = ...) -> None: ...
