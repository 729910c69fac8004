"""SGLang plugin entry point (``sglang.srt.plugins`` group in pyproject.toml).

SGLang calls :func:`register` in every process before arguments are parsed. This is the only
module that touches SGLang's registries; the model, pools and attention backend arrive with the
integration work and register here.
"""


def register() -> None:
    """Nothing is registered yet: the DSV4 model and backend are not wired into SGLang."""
