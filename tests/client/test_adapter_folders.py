"""The SDK zips adapter folders for import: ours, ours in the old layout, and PEFT LoRA folders."""

from __future__ import annotations

import io
import zipfile

import pytest
from spafit_client._endpoints import adapter_archive


def names(data: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return sorted(z.namelist())


@pytest.mark.parametrize("files, zipped", [
    (["spafit_adapter.json", "adapter.safetensors"], ["adapter.safetensors", "spafit_adapter.json"]),
    (["adapter_config.json", "adapter.safetensors"], ["adapter.safetensors", "adapter_config.json"]),
    (["adapter_config.json", "adapter_model.safetensors", "README.md"],
     ["adapter_config.json", "adapter_model.safetensors"]),
    (["adapter_config.json", "adapter_model.safetensors", "spafit_export.json"],
     ["adapter_config.json", "adapter_model.safetensors", "spafit_export.json"]),
])
def test_each_kind_of_adapter_folder_is_zipped_with_its_files(tmp_path, files, zipped):
    for f in files:
        (tmp_path / f).write_bytes(b"{}")
    assert names(adapter_archive(tmp_path)) == zipped


def test_a_folder_that_is_no_adapter_is_refused(tmp_path):
    (tmp_path / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="spafit_adapter.json"):
        adapter_archive(tmp_path)
