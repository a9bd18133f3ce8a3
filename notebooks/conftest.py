"""nbval settings: compare no stderr (warnings carry per-run ipykernel temp paths)."""


def pytest_collectstart(collector):
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("stderr",)
