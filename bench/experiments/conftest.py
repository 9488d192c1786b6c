# The experiment scripts run when imported (some read sys.argv at the top), so pytest collects only the test file
# here, not the scripts (pyproject.toml's addopts imports every module for its doctests).
def pytest_ignore_collect(collection_path, config):
    return collection_path.suffix == ".py" and not collection_path.name.startswith(("test_", "conftest"))
