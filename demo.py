"""Run RT-Lynx on the embedded tiny DiT: dense vs Lynx, error and timing (see README)."""
from standalone import load_pack

if __name__ == "__main__":
    load_pack()
    from rt_lynx_pack.lynx.demo import main
    main()
