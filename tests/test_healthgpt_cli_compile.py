"""``healthgpt answer --compile`` / ``healthgpt generate --compile`` reach the static decoder as
``compile=True`` (the compiled step itself is ``test_healthgpt_decode``'s test; compiling here again
would cost a minute per command)."""

import numpy as np
import pytest
from PIL import Image

import healthgpt.model.healthgpt as healthgpt_module
from healthgpt.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")


class Reached(Exception):
    """Raised by the stand-in decoder with the options it was called with."""


@pytest.mark.parametrize("flag", [[], ["--compile"]])
def test_compile_flag_reaches_the_decoder(tmp_path, monkeypatch, flag):
    def stand_in(*args, **kwargs):  # stops at the decoder: the flag's path is under test, not decoding
        raise Reached(kwargs)

    monkeypatch.setattr(healthgpt_module, "decode", stand_in)
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(src)
    commands = (["answer", "--question", "Hello?", "--max-new-tokens", "3"],
                ["generate", "--image", str(src), "--instruction", "Convert to MRI.", "--out", str(tmp_path / "o.png")])
    for command in commands if flag else commands[:1]:  # without the flag one command says it: the default
        with pytest.warns(UserWarning, match="random weights"), pytest.raises(Reached) as reached:
            main(command + ["--device", "cpu"] + flag)
        assert reached.value.args[0].get("compile", False) is bool(flag)
