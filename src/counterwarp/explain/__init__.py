"""counterwarp.explain"""
