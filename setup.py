"""Build hook: ship the warehouse DDL (`warehouse/*.sql`) inside the wheel as `nds/platform/sql/`.

The repository keeps the one copy of the SQL in `warehouse/`; every build copies it into the
package, where `nds.platform.warehouse` finds it with importlib.resources. An editable install
(`pip install -e .`) has no copy and reads `warehouse/` beside the package instead.
All other metadata lives in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SQL_SOURCE = Path(__file__).resolve().parent / "warehouse"
SQL_PACKAGE_DIR = ("nds", "platform", "sql")


class build_py_with_sql(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # the editable install reads warehouse/ in place
            return
        files = sorted(SQL_SOURCE.glob("*.sql"))
        if not files:
            raise SystemExit(f"no warehouse DDL in {SQL_SOURCE}: the wheel would not work")
        target = Path(self.build_lib).joinpath(*SQL_PACKAGE_DIR)
        self.mkpath(str(target))
        for f in files:
            self.copy_file(str(f), str(target / f.name))

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            target = Path(self.build_lib).joinpath(*SQL_PACKAGE_DIR)
            outputs += [str(target / f.name) for f in sorted(SQL_SOURCE.glob("*.sql"))]
        return outputs


setup(cmdclass={"build_py": build_py_with_sql})
