"""`qcal models`."""
from __future__ import annotations

import click


@click.command()
def models():
    """List the supported models and where their weights come from."""
    from qcal.families import family_of, listed_specs

    for spec in listed_specs():
        weights = family_of(spec.name).weights_note(spec)
        shape = "x".join(str(d) for d in spec.input_shape)
        click.echo(f"{spec.name:22s} {shape:10s} {spec.classes:5d} classes  {weights:26s} "
                   f"{spec.description}")
