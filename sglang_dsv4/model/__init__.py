"""The DSV4 model SGLang serves (registered over the built-in one by the plugin)."""
