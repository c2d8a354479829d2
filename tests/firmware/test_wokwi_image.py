"""The Wokwi flash image: the LittleFS partition holds exactly the firmware, read back file by file, and the
merged image puts it at the offset wokwi.toml's MicroPython build mounts."""

import importlib.util
import json
from pathlib import Path

from littlefs import LittleFS
from littlefs.context import UserContext

REPO = Path(__file__).resolve().parents[2]


def _builder():
    spec = importlib.util.spec_from_file_location("build_image", REPO / "wokwi" / "build_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read_back(image: bytes, block: int) -> LittleFS:
    context = UserContext(len(image))
    context.buffer[:] = image  # in place: the C side keeps a reference to this buffer
    return LittleFS(context=context, block_size=block, block_count=len(image) // block)


def test_littlefs_image_reads_back_the_firmware(mpy_lib):
    builder = _builder()
    image = builder.build_filesystem("broker.example")
    assert len(image) == builder.FS_SIZE
    fs = _read_back(image, builder.BLOCK)
    with fs.open("main.py", "rb") as f:
        assert f.read() == (REPO / "firmware" / "main.py").read_bytes()
    for src in (REPO / "firmware" / "lib").glob("*.py"):
        with fs.open(f"lib/{src.name}", "rb") as f:
            assert f.read() == src.read_bytes(), src.name
    with fs.open("lib/umqtt/simple.py", "rb") as f:
        assert b"class MQTTClient" in f.read()
    with fs.open("config.json", "r") as f:
        config = json.loads(f.read())
    assert config["mqtt"]["host"] == "broker.example"
    assert sorted(fs.listdir("/")) == ["config.json", "lib", "main.py"]


def test_merged_image_places_the_filesystem_at_its_partition(tmp_path, mpy_lib):
    builder = _builder()
    micropython = tmp_path / "micropython.bin"
    # a stand-in application image: esptool only needs the ESP image magic byte to merge it
    micropython.write_bytes(b"\xe9" + b"\x00" * 4095)
    littlefs = tmp_path / "littlefs.bin"
    littlefs.write_bytes(builder.build_filesystem())
    out = tmp_path / "flash.bin"
    builder.merge(micropython, littlefs, out)
    merged = out.read_bytes()
    assert merged[0x1000] == 0xE9
    part = merged[builder.FS_OFFSET:builder.FS_OFFSET + builder.FS_SIZE]
    fs = _read_back(part.ljust(builder.FS_SIZE, b"\xff"), builder.BLOCK)  # keep it alive while a file is open
    with fs.open("main.py", "rb") as f:
        assert f.read() == (REPO / "firmware" / "main.py").read_bytes()
