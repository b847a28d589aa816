"""The commands of ``coap-bench``, one module each: ``add_parser`` registers its flags on the
command line's sub-parsers, ``run`` runs it from the parsed flags and returns the exit status."""
