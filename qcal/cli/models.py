"""`qcal models`."""
from __future__ import annotations

import click


@click.command()
def models():
    """List the supported models and where their weights come from, then every model family and
    how --model names its models."""
    from qcal.families import FAMILIES, family_of, listed_specs

    for spec in listed_specs():
        weights = family_of(spec.name).weights_note(spec)
        shape = "x".join(str(d) for d in spec.input_shape)
        click.echo(f"{spec.name:22s} {shape:10s} {spec.classes:5d} classes  {weights:26s} "
                   f"{spec.description}")
    click.echo("\nmodel families (what --model takes):")
    for family in FAMILIES.keys():
        click.echo(f"  {family:14s} {FAMILIES.lookup(family).naming}")
