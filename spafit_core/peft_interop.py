"""PEFT interop: our adapters as PEFT LoRA folders, and PEFT LoRA folders as our adapters.

Export (`to_peft`) writes what `peft.PeftModel.from_pretrained(AutoModelForSequenceClassification...)`
loads with no custom code:
- LoRA factors of the layers [n2, L) as PEFT's `lora_A.weight` / `lora_B.weight`, `target_modules` the
  full names of the adapted modules and `layers_to_transform` the same layers (PEFT's scaling is
  lora_alpha / r, ours alpha / rank: the same number);
- bias deltas: PEFT has no bias delta, but its `bias="all"` stores and loads bias tensors of the base
  model. We store, for each module whose bias trained, base bias + delta: loading replaces the stock
  bias with ours, which is exact (the forward is x W^T + b'). As PEFT documents for `bias="all"`,
  `disable_adapter()` then no longer restores the base biases;
- the head (everything outside the base model) through `modules_to_save`.
A third file, `spafit_export.json`, records the label map and task type (PEFT's config has no place for
them): load the stock classifier with `num_labels=len(labels)` and `id2label`.

Import (`from_peft`) reads a PEFT LoRA folder trained on the stock classifier into a SpafitModel: LoRA
on a contiguous top range of layers [k, L) with one rank and one set of target roles, optional bias
tensors (kept as deltas against the base, which must then lie in [n1, L)), and the head from
`modules_to_save`. Anything it cannot represent exactly (DoRA, per-module ranks, LoRA on embeddings or
on a lower range of layers, a changed bias outside the layer stack, no head) is refused, naming it.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .adapter_schema import MAX_LABELS, read_member
from .config import MethodConfig, TaskSpec
from .errors import AdapterError
from .layers import AdaptedLinear
from .model import HEAD, SpafitModel, refuse_encoder_decoder

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
EXPORT_INFO = "spafit_export.json"
PREFIX = "base_model.model."  # PEFT's state-dict prefix for the wrapped model
MAX_FILE_BYTES = 256 << 20


# ----------------------------------------------------------------------------------------- export
def to_peft(model: SpafitModel) -> dict[str, bytes]:
    """The files of a PEFT LoRA folder equal to `model` (file name -> bytes)."""
    plan = model.plan
    if plan.full:
        raise AdapterError("a full fine-tune has no adapter to export to PEFT; export the merged model instead",
                           field="method")
    lora_keys = [k for k, m in model.adapted.items() if isinstance(m, AdaptedLinear) and m.lora_A is not None]
    if not lora_keys:
        raise AdapterError(f"method {model.method_config.name!r} trains no LoRA factors here, and PEFT's LoRA "
                           "format needs at least one LoRA layer: export the merged model instead", field="method")
    base = model.base_prefix + "."
    tensors: dict[str, torch.Tensor] = {}
    biased = []
    for key, mod in model.adapted.items():
        full = PREFIX + base + key
        if key in lora_keys:
            tensors[f"{full}.lora_A.weight"] = mod.lora_A
            tensors[f"{full}.lora_B.weight"] = mod.lora_B
        if mod.bias_delta is not None:
            if mod.base.bias is None:
                raise AdapterError(f"{key} has a bias delta but no base bias: PEFT cannot load it", field="method")
            name = f"{full}.base_layer.bias" if key in lora_keys else f"{full}.bias"
            tensors[name] = mod.base.bias + mod.bias_delta
            biased.append(key)
    head_modules = sorted({n.split(".")[0] for n, _ in model.head_named_parameters()})
    for name, p in model.head_named_parameters():
        tensors[PREFIX + name] = p
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sorted(tensors.items())}
    layers = sorted({_layer_of(model, k) for k in lora_keys})
    c = model.method_config
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": model.base_model_name,
        "r": c.rank,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "target_modules": sorted(base + k for k in lora_keys),
        "layers_to_transform": layers,
        "layers_pattern": model.stack.path.rsplit(".", 1)[-1],
        "bias": "all" if biased else "none",
        "modules_to_save": head_modules,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
    }
    info = {"format": "spafit-peft-export", "task": model.task.to_dict(),
            "base_model": {"name": model.base_model_name, "fingerprint": model.base_fingerprint},
            "method": c.to_dict(), "bias_modules": sorted(base + k for k in biased),
            "load": "AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(labels), "
                    "id2label=dict(enumerate(labels))); PeftModel.from_pretrained(model, folder)"}
    return {PEFT_CONFIG: json.dumps(config, indent=2, sort_keys=True).encode() + b"\n",
            PEFT_WEIGHTS: st_save(tensors, metadata={"format": "pt"}),
            EXPORT_INFO: json.dumps(info, indent=2, sort_keys=True).encode() + b"\n"}


def _layer_of(model: SpafitModel, key: str) -> int:
    return int(key[len(model.stack.path) + 1:].split(".", 1)[0])


# ----------------------------------------------------------------------------------------- import
# PEFT config keys whose non-default values change the function we would compute: refuse them.
_MUST_BE_FALSY = ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "target_parameters",
                  "trainable_token_indices", "lora_bias", "layer_replication", "use_qalora", "use_bdlora",
                  "megatron_config")


def is_peft_config(cfg: Any) -> bool:
    return isinstance(cfg, dict) and "peft_type" in cfg


def read_peft_files(files: dict[str, bytes]) -> tuple[dict, dict[str, torch.Tensor], dict | None]:
    """(PEFT config, tensors, our export info or None) of a PEFT folder's files. safetensors only."""
    if PEFT_CONFIG not in files:
        raise AdapterError(f"a PEFT adapter needs {PEFT_CONFIG}", field="format")
    if PEFT_WEIGHTS not in files:
        pickled = "adapter_model.bin" in files
        raise AdapterError(f"a PEFT adapter needs {PEFT_WEIGHTS}" + (
            " (adapter_model.bin found: pickled weights are never loaded; save with safe_serialization=True)"
            if pickled else ""), field="format")
    try:
        cfg = json.loads(files[PEFT_CONFIG])
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise AdapterError(f"{PEFT_CONFIG} is not valid JSON: {type(e).__name__}") from None
    if not is_peft_config(cfg):
        raise AdapterError(f"{PEFT_CONFIG} is not a PEFT config (no peft_type)", field="peft_type")
    try:
        tensors = st_load(files[PEFT_WEIGHTS])
    except Exception as e:  # a malformed header raises various errors
        raise AdapterError(f"{PEFT_WEIGHTS} is not a valid safetensors file: {type(e).__name__}") from None
    info = None
    if EXPORT_INFO in files:
        try:
            info = json.loads(files[EXPORT_INFO])
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise AdapterError(f"{EXPORT_INFO} is not valid JSON") from None
        if not isinstance(info, dict):
            raise AdapterError(f"{EXPORT_INFO} must be a JSON object")
    return cfg, tensors, info


def peft_method(cfg: dict, tensors: dict[str, torch.Tensor], *, base_prefix: str, stack_path: str,
                num_layers: int, roles_of: dict[str, str]) -> tuple[MethodConfig, dict[str, torch.Tensor],
                                                                   dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Map a PEFT LoRA config + tensors onto (method, LoRA tensors by our key, bias tensors by our module
    key, head tensors by our name). `roles_of` maps a module path relative to a layer to its role.
    Raises AdapterError naming what cannot be represented."""
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"only PEFT LoRA adapters can be imported; got peft_type={cfg.get('peft_type')!r}",
                           field="peft_type")
    for key in _MUST_BE_FALSY:
        if cfg.get(key):
            raise AdapterError(f"PEFT option {key}={cfg[key]!r} has no SPAFIT equivalent; retrain without it",
                               field=key)
    r = cfg.get("r")
    alpha = cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"PEFT r must be an integer >= 1; got {r!r}", field="r")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"PEFT lora_alpha must be a number > 0; got {alpha!r}", field="lora_alpha")
    if cfg.get("use_rslora"):  # PEFT scales by alpha / sqrt(r); ours by alpha / r: the same with alpha * sqrt(r)
        alpha = alpha * math.sqrt(r)
    dropout = cfg.get("lora_dropout") or 0.0
    if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        dropout = 0.0  # a training-time setting only: it does not change what we serve

    base = PREFIX + base_prefix + "."
    layer_re = re.compile(re.escape(base + stack_path) + r"\.(\d+)\.(.+)$")
    lora: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    lora_layers: dict[int, set[str]] = {}
    for name, t in tensors.items():
        if not name.startswith(PREFIX):
            raise AdapterError(f"unexpected tensor {name!r} in {PEFT_WEIGHTS}", field="weights")
        if not name.startswith(base):  # the head, saved through modules_to_save
            rel = name[len(PREFIX):]
            if ".original_module." in rel:
                continue
            rel = re.sub(r"\.modules_to_save(\.[^.]+)?\.", ".", rel)
            head[HEAD + rel] = t
            continue
        m = layer_re.match(name)
        if ".lora_" in name:
            if m is None or not name.endswith((".lora_A.weight", ".lora_B.weight")):
                raise AdapterError(f"LoRA tensor {name!r} is outside the encoder layers or of an unsupported kind "
                                   "(embedding LoRA): SPAFIT adapts the linear modules of the layer stack",
                                   field="target_modules")
            layer, rest = int(m.group(1)), m.group(2)
            path, _, which = rest.rpartition(".lora_")
            if path not in roles_of:
                raise AdapterError(f"LoRA on {path!r} of layer {layer}, which is none of SPAFIT's target roles "
                                   f"({', '.join(sorted(set(roles_of.values())))})", field="target_modules")
            if t.dim() != 2 or (which == "A.weight" and t.shape[0] != r) or (which == "B.weight" and t.shape[1] != r):
                raise AdapterError(f"{name} has shape {tuple(t.shape)}, not rank {r}", field="r")
            module = name[len(PREFIX):].rsplit(".lora_", 1)[0]
            if not _peft_targets(cfg, module, layer):
                raise AdapterError(f"{PEFT_WEIGHTS} holds LoRA factors for {module}, which {PEFT_CONFIG}'s "
                                   "target_modules / layers_to_transform do not select: PEFT would not load them, "
                                   "so the folder is inconsistent", field="target_modules")
            lora_layers.setdefault(layer, set()).add(roles_of[path])
            lora[f"{stack_path}.{layer}.{path}.lora_{which[0]}"] = t
        elif name.endswith(".bias"):
            key = name[len(base):-len(".bias")].removesuffix(".base_layer")
            biases[key] = t
        else:
            raise AdapterError(f"unexpected tensor {name!r} in {PEFT_WEIGHTS}", field="weights")
    if not lora_layers:
        raise AdapterError("the PEFT adapter holds no LoRA factors", field="target_modules")
    if not head:
        raise AdapterError("the PEFT adapter holds no classifier head: train it with task_type='SEQ_CLS' (or the "
                           "head in modules_to_save), else the served head would be random", field="modules_to_save")
    k = min(lora_layers)
    if sorted(lora_layers) != list(range(k, num_layers)):
        raise AdapterError(f"LoRA layers {sorted(lora_layers)} are not a top range [k, {num_layers}): SPAFIT "
                           "adapts every layer from a boundary up", field="layers_to_transform")
    targets = lora_layers[k]
    if any(roles != targets for roles in lora_layers.values()):
        raise AdapterError("the PEFT adapter targets different modules in different layers", field="target_modules")
    for key in [*lora]:  # each module has both factors
        other = key[:-1] + ("B" if key.endswith("A") else "A")
        if other not in lora:
            raise AdapterError(f"{key} has no matching lora_{other[-1]}", field="weights")
    method = MethodConfig(name="spafit", n1=k, n2=k, rank=r, alpha=float(alpha), dropout=float(dropout),
                          targets=tuple(sorted(targets)), group3_bias=False)
    return method, lora, biases, head


def _peft_targets(cfg: dict, module: str, layer: int) -> bool:
    """Whether PEFT, loading `cfg`, puts LoRA on `module` (its name in the stock classifier) of layer `layer`:
    PEFT's own rule for a list of names (a name or dotted suffix, then `layers_to_transform`; not listed in
    `exclude_modules`). A config without such a list (none, or a regex: a client's regex is never run here)
    is taken at its weights' word."""
    targets = cfg.get("target_modules")
    excluded = cfg.get("exclude_modules")
    if isinstance(excluded, list) and any(module == e or module.endswith(f".{e}") for e in excluded
                                           if isinstance(e, str)):
        return False
    if not isinstance(targets, list):
        return True
    if module in targets:
        return True
    if not any(isinstance(t, str) and module.endswith(f".{t}") for t in targets):
        return False
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, bool) or layers is None or layers == []:
        return True
    return layer == layers if isinstance(layers, int) else not isinstance(layers, list) or layer in layers


def from_peft(files: dict[str, bytes], base_model: str, *, task: TaskSpec | None = None,
              labels: list[str] | None = None) -> SpafitModel:
    """A SpafitModel on `base_model` (real weights) equal to the PEFT adapter in `files` on the stock
    classifier. Labels: `task`, else `labels`, else our export info, else LABEL_0.. by the head's size."""
    from .model import load_hf_classifier
    from .stratify import find_stack

    cfg, tensors, info = read_peft_files(files)
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:  # refused here, so that no path (the CLI's import writes a folder) keeps such an adapter
        raise AdapterError(f"{PEFT_WEIGHTS}: tensor {bad[0]} holds NaN or infinite values", field="weights")
    task = task or _task_of(tensors, labels, info)
    hf = load_hf_classifier(base_model, task)
    refuse_encoder_decoder(hf)  # as SpafitModel does, before the stack is searched
    prefix = hf.base_model_prefix
    stack = find_stack(hf.base_model)
    roles_of = {path: role for spec in stack.layers for role, path in spec.roles.items()}
    method, lora, biases, head = peft_method(cfg, tensors, base_prefix=prefix, stack_path=stack.path,
                                             num_layers=stack.num_layers, roles_of=roles_of)
    # Bias tensors are whole biases: keep those that differ from the base as deltas.
    base_sd = hf.base_model.state_dict()
    deltas: dict[str, torch.Tensor] = {}
    for key, b in biases.items():
        own = base_sd.get(f"{key}.bias")
        if own is None or tuple(own.shape) != tuple(b.shape):
            raise AdapterError(f"bias of {key!r} does not exist in the base model with shape {tuple(b.shape)}",
                               field="weights")
        d = b.to(torch.float32) - own.to(torch.float32)
        if bool(d.any()):
            deltas[key] = d
    outside = sorted(k for k in deltas if not k.startswith(stack.path + "."))
    if outside:
        raise AdapterError(f"the PEFT adapter changes the bias of {outside[0]}, outside the layer stack: SPAFIT "
                           "cannot represent it", field="bias")
    if deltas:
        layers = {int(k[len(stack.path) + 1:].split(".", 1)[0]) for k in deltas}
        n1 = min(min(layers), method.n2)
        method = MethodConfig(**{**method.to_dict(), "targets": method.targets, "n1": n1,
                                 "group3_bias": any(i >= method.n2 for i in layers)})
    model = SpafitModel(hf, method, task, base_model_name=base_model)
    own = model.adapter_state_dict()
    state = {k: torch.zeros_like(v) for k, v in own.items()}
    for k, t in {**lora, **head}.items():
        state[k] = t
    for key, d in deltas.items():
        name = f"{key}.bias_delta"
        if name not in own:
            raise AdapterError(f"the PEFT adapter changes the bias of {key}, which this method's split "
                               f"(n1={method.n1}, n2={method.n2}) does not train", field="bias")
        state[name] = d
    model.load_adapter_state_dict(state)  # refuses any name or shape that does not fit
    model.eval()
    return model


def serialize_imported(model: SpafitModel, *, max_seq_length: int = 128) -> tuple[dict, bytes]:
    """Our (config, weights) of an imported model; `max_seq_length` capped by the base model's position table
    (PEFT records no sequence length)."""
    from .adapter import backbone_limits, serialize

    most = backbone_limits(model.base_model_name).get("max_seq_length")
    return serialize(model, max_seq_length=min(max_seq_length, most) if most else max_seq_length,
                     training={"imported_from": "peft"})


def _task_of(tensors: dict[str, torch.Tensor], labels: list[str] | None, info: dict | None) -> TaskSpec:
    """The task, its labels bounded as any adapter's (`MAX_LABELS`) before a head of that size is built."""
    task = _unbounded_task_of(tensors, labels, info)
    if len(task.labels) > MAX_LABELS:
        raise AdapterError(f"the PEFT adapter has {len(task.labels)} labels; an adapter has at most {MAX_LABELS}",
                           field="labels")
    return task


def _unbounded_task_of(tensors: dict[str, torch.Tensor], labels: list[str] | None, info: dict | None) -> TaskSpec:
    if labels:
        return TaskSpec(labels=tuple(labels))
    if info is not None and isinstance(info.get("task"), dict):
        try:
            return TaskSpec.from_dict(info["task"])
        except Exception as e:
            raise AdapterError(f"{EXPORT_INFO}: task: {e}", field="task") from None
    # The head's output size: the smallest 1-D head tensor (the output bias; a pre-classifier is wider).
    # Head tensors are those outside the base model, whose prefix the LoRA tensors name.
    base = {n[len(PREFIX):].split(".", 1)[0] for n in tensors if ".lora_" in n and n.startswith(PREFIX)}
    sizes = [t.shape[0] for n, t in tensors.items()
             if t.dim() == 1 and n.startswith(PREFIX) and n[len(PREFIX):].split(".", 1)[0] not in base]
    n = min(sizes) if sizes else None
    if n is None:
        raise AdapterError("cannot tell the number of labels of the PEFT head: give the labels", field="labels")
    if n == 1:
        return TaskSpec(task_type="regression")
    if n > MAX_LABELS:
        raise AdapterError(f"the PEFT adapter's head has {n} outputs; an adapter has at most {MAX_LABELS} labels",
                           field="labels")
    return TaskSpec(labels=tuple(f"LABEL_{i}" for i in range(n)))


# ----------------------------------------------------------------------------------------- transport
PEFT_FILES = (PEFT_CONFIG, PEFT_WEIGHTS, EXPORT_INFO)


def pack_peft(files: dict[str, bytes]) -> bytes:
    """A deterministic zip of a PEFT folder's files (fixed timestamps): unzip it and point PEFT at it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, files[name])
    return buf.getvalue()


def is_peft_archive(data: bytes) -> bool:
    """Whether a zip holds a PEFT adapter (its weights file has PEFT's name)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = {n.rsplit("/", 1)[-1] for n in z.namelist()}
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return bool({PEFT_WEIGHTS, "adapter_model.bin"} & names)


def unpack_peft(data: bytes, *, max_bytes: int = MAX_FILE_BYTES) -> dict[str, bytes]:
    """The files of a zipped PEFT folder (PEFT's README.md and the like are ignored; no paths are used),
    each bounded by `max_bytes` before it is decompressed."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise AdapterError(f"adapter upload is not a zip of a PEFT folder ({PEFT_CONFIG} + {PEFT_WEIGHTS})") from None
    files: dict[str, bytes] = {}
    with z:
        for info in z.infolist():
            name = info.filename.rsplit("/", 1)[-1]
            if info.is_dir() or name not in (*PEFT_FILES, "adapter_model.bin"):
                continue
            if name in files:
                raise AdapterError(f"the PEFT archive holds {name} twice")
            if info.file_size > max_bytes:
                raise AdapterError(f"{name} is larger than the limit of {max_bytes} bytes")
            files[name] = b"" if name == "adapter_model.bin" else read_member(z, info, "PEFT archive")
    return files


def read_peft_folder(folder) -> dict[str, bytes]:
    folder = Path(folder)
    return {n: (folder / n).read_bytes() if n != "adapter_model.bin" else b""
            for n in (*PEFT_FILES, "adapter_model.bin") if (folder / n).is_file()}
