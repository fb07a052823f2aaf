"""The runtime core: everything training needs that is neither a service nor a wire
format. Pure Python + NumPy over the graph IR and the kernel backends; imports no
grpc, protobuf or numba of its own (import-linter checks).

- ``plan``: a model graph plus its backward pass (``TrainPlan``);
- ``executor``: compiles a graph per input signature into a schedule of kernel calls;
- ``step``: one training / evaluation step of a plan (``StepRunner``);
- ``loop``: THE training loop (``TrainingLoop`` over a ``Schedule``), run by ``model.fit``
  and by every worker;
- ``parameters``: the parameter-server client interface ``ParameterClient``
  (``pull``, ``push_pull``) and its in-process implementation ``LocalParameterClient``;
- ``modes``: the consistency ``Mode`` enum (the policies are ``psserver.consistency``);
- ``spec``: plain, validated job types (``TrainConfig``, ``ModelSpec``, ``JobSpec``,
  ``TaskSpec``, ``Progress``, ``HeartbeatReply``; ``Device``) that protobuf only
  meets at the service edge (``protos.jobcodec``);
- ``optimizers``: one registered class per optimizer (``init_state`` / ``update``),
  learning-rate schedules, and ``Optimizer``, which applies one to a parameter;
- ``store``: a parameter store (variables + optimizer; every push checked whole);
- ``placement``: variables split into byte-balanced row ranges across shards; the one
  slicing and assembly implementation;
- ``datasets``: datasets by name, epoch permutations, worker shards (``from client import datasets``);
- ``metrics``: accuracy as Keras computes it;
- ``modelfile``: the one model-file format (``pstrain-model/1``);
- ``files``: the one atomic-write helper (write, fsync, rename, fsync dir).

May import: ``pstrain.kernels``, ``graph``.
"""
