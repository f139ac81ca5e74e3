"""``python -m megadigpt.checkpoint.safe_universal <ds_to_universal arguments>``: DeepSpeed's
``deepspeed.checkpoint.ds_to_universal`` with every ``torch.load`` made safe (:mod:`.safe_load`), since the
converter unpickles every shard with ``weights_only=False``. A refused file ends the conversion with one
``megadigpt: error: ...`` line on stderr and exit code 2 (``ds_checkpoint.make_universal`` passes it on)."""

import sys


def main(argv=None) -> int:
    from deepspeed.checkpoint import ds_to_universal

    from ..config import ConfigError
    from . import safe_load

    sys.argv = [ds_to_universal.__file__, *(sys.argv[1:] if argv is None else argv)]
    args = ds_to_universal.parse_arguments()
    try:
        safe_load.check_folder(args.input_folder)
        with safe_load.deepspeed_loads():
            ds_to_universal.main(args)
    except ConfigError as e:
        print(f"megadigpt: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
