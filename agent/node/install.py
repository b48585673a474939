"""``prism-agent install-service``: the systemd unit, a system user and the config files."""

from __future__ import annotations

import pwd
import shutil
import subprocess
import sys
from pathlib import Path

from engine.errors import PrismError

USER = "prism-agent"


class InstallError(PrismError):
    """The service could not be installed."""

    code = "install_error"


def _template(name: str) -> str:
    path = Path(__file__).resolve().parents[2] / "systemd" / name
    if not path.is_file():
        raise InstallError(f"{path} is missing: install-service runs from a checkout (scripts/setup.sh)")
    return path.read_text()


def render_unit(executable: Path | None = None) -> str:
    """The unit file with ExecStart pointing at this installation's ``prism-agent``."""
    exe = executable or Path(sys.executable).parent / "prism-agent"
    return _template("prism-agent.service").replace("@PRISM_AGENT@", str(exe))


def _user_exists() -> bool:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return False
    return True


def install(
    unit_dir: Path = Path("/etc/systemd/system"), config_dir: Path = Path("/etc/prism-agent"), user: bool = True
) -> list[str]:
    """Create the user, config and unit (root only); returns what was done, line by line."""
    done: list[str] = []
    if user and not _user_exists():
        if shutil.which("useradd") is None:
            raise InstallError("useradd is missing; create a system user 'prism-agent' by hand")
        home = "/var/lib/prism-agent"
        cmd = ["useradd", "--system", "--no-create-home", "--home-dir", home, "--shell", "/usr/sbin/nologin", USER]
        subprocess.run(cmd, check=True)
        done.append(f"created system user {USER}")
    config_dir.mkdir(parents=True, exist_ok=True)
    toml = config_dir / "agent.toml"
    if not toml.exists():
        toml.write_text(_template("agent.toml"))
        done.append(f"wrote {toml}")
    env = config_dir / "agent.env"
    if not env.exists():
        env.write_text("# PRISM_* overrides and secrets for prism-agent (mode 0600)\n")
        env.chmod(0o600)
        done.append(f"wrote {env}")
    unit = unit_dir / "prism-agent.service"
    unit.write_text(render_unit())
    done.append(f"wrote {unit}")
    done.append("next: systemctl daemon-reload && systemctl enable --now prism-agent")
    return done
