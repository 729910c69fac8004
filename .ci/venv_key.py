"""Print the cache key of the test virtualenv: a hash of the dependency pins in pyproject.toml."""

import hashlib
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
pins = sorted(project["dependencies"]) + sorted(project["optional-dependencies"]["test"])
pins.append(f"py{sys.version_info.major}.{sys.version_info.minor}")
print(hashlib.sha256("\n".join(pins).encode()).hexdigest()[:16])
